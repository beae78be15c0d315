// sd-bus and sd-daemon. The variadic helpers (sd_bus_call_method, sd_bus_message_append) are
// not used: messages are built with sd_bus_message_new_method_call + append_basic +
// open_container, which import cleanly. Shims here are prefixed `csd_`.
#ifndef CSYSTEMD_SHIM_H
#define CSYSTEMD_SHIM_H
#include <systemd/sd-bus.h>
#include <systemd/sd-daemon.h>
#include <sys/eventfd.h>

/// eventfd(2) for waking the bus thread (glibc's header is not part of Swift's Glibc module).
static inline int csd_eventfd_nonblocking(void) { return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }
static inline int csd_eventfd_signal(int fd) { return eventfd_write(fd, 1); }
static inline int csd_eventfd_drain(int fd) { eventfd_t v; return eventfd_read(fd, &v); }

/// An sd_bus_error initialised as SD_BUS_ERROR_NULL (a macro Swift cannot import).
static inline sd_bus_error csd_bus_error_null(void) {
    sd_bus_error e = SD_BUS_ERROR_NULL;
    return e;
}

/// sd_notify with a fixed string (the variadic sd_notifyf is not needed).
static inline int csd_notify(int unset_environment, const char *state) {
    return sd_notify(unset_environment, state);
}

#include <fcntl.h>
#include <unistd.h>
#include <signal.h>
#include <sys/prctl.h>

// GNU extensions that Swift's Glibc module does not declare without _GNU_SOURCE.
int pipe2(int pipefd[2], int flags);

/// pipe2(2) with O_CLOEXEC: no child spawned meanwhile by another thread inherits the ends.
static inline int csd_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

/// fork(2) + prctl(PR_SET_PDEATHSIG, sig) + execve(2): a child that the kernel sends `sig`
/// when the forking thread (or the whole parent) dies. stdin is /dev/null; stdout and stderr
/// go to `out_fd` when it is >= 0. Between fork and exec the child calls only
/// async-signal-safe functions, as a multithreaded parent requires.
/// Returns the child's pid, or -1 with errno set.
static inline pid_t csd_spawn_pdeathsig(const char *path, char *const argv[], char *const envp[], int sig, int out_fd) {
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid != 0) return pid;
    if (prctl(PR_SET_PDEATHSIG, sig) < 0) _exit(127);
    // The parent may have died between fork and prctl.
    if (getppid() != parent) _exit(127);
    int null_fd = open("/dev/null", O_RDWR);
    if (null_fd >= 0) dup2(null_fd, 0);
    if (out_fd >= 0) { dup2(out_fd, 1); dup2(out_fd, 2); }
    else if (null_fd >= 0) { dup2(null_fd, 1); dup2(null_fd, 2); }
    setpgid(0, 0);
    execve(path, argv, envp);
    _exit(127);
}
#endif
