#define _GNU_SOURCE
#include "CGitWorkspace.h"
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

// Everything between fork and exec is a plain system call: the parent has many threads, and
// the child may only use async-signal-safe functions.

static void report(int fd, int step) {
    int message[2] = {step, errno};
    ssize_t ignored = write(fd, message, sizeof message);
    (void)ignored;
    _exit(127);
}

static int write_all(int fd, const char *data, size_t length) {
    while (length > 0) {
        ssize_t n = write(fd, data, length);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        data += n;
        length -= (size_t)n;
    }
    return 0;
}

static int make_files(const agentd_git_file *files, size_t count) {
    for (size_t i = 0; i < count; i++) {
        if (files[i].data == NULL) {
            if (mkdir(files[i].path, files[i].mode) != 0) return -1;
            continue;
        }
        int fd = open(files[i].path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, files[i].mode);
        if (fd < 0) return -1;
        int rc = write_all(fd, files[i].data, files[i].length);
        close(fd);
        if (rc != 0) return -1;
    }
    return 0;
}

/// "/proc/self/fd/<fd>" into `out` (at least 32 bytes), without printf.
static void proc_fd_path(char *out, int fd) {
    const char prefix[] = "/proc/self/fd/";
    size_t n = 0;
    for (; prefix[n]; n++) out[n] = prefix[n];
    char digits[12];
    int count = 0;
    unsigned value = (unsigned)fd;
    do {
        digits[count++] = (char)('0' + value % 10);
        value /= 10;
    } while (value > 0);
    while (count > 0) out[n++] = digits[--count];
    out[n] = 0;
}

static void child(const agentd_git_spawn_request *r, int error_fd) {
    // Default dispositions and no blocked signal: the forking thread may block most signals
    // or ignore SIGPIPE, and git relies on the defaults (a reader gone must end a writer).
    for (int s = 1; s < NSIG; s++) {
        if (s == SIGKILL || s == SIGSTOP) continue;
        struct sigaction action = {0};
        action.sa_handler = SIG_DFL;
        sigaction(s, &action, NULL);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    if (setsid() < 0) report(error_fd, AGENTD_GIT_STEP_SETSID);
    if (unshare(CLONE_NEWNS) != 0) report(error_fd, AGENTD_GIT_STEP_UNSHARE);
    // Nothing mounted here reaches the host; what the host unmounts goes away here too.
    if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) != 0) report(error_fd, AGENTD_GIT_STEP_PRIVATE);
    // The workspace again, in this namespace: its host path may lie under `scratch` (hidden
    // once the tmpfs is there) and under directories the sandbox's uid cannot search.
    int workspace = open(r->workspace_path, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    struct stat now, before;
    if (workspace < 0 || fstat(workspace, &now) != 0 || fstat(r->workspace_fd, &before) != 0) report(error_fd, AGENTD_GIT_STEP_REOPEN);
    if (now.st_dev != before.st_dev || now.st_ino != before.st_ino) {
        errno = ESTALE;
        report(error_fd, AGENTD_GIT_STEP_REOPEN);
    }
    close(r->workspace_fd);
    char source[32];
    proc_fd_path(source, workspace);
    if (mount("tmpfs", r->scratch, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=8m") != 0)
        report(error_fd, AGENTD_GIT_STEP_TMPFS);
    umask(022);
    if (make_files(r->files, r->file_count) != 0) report(error_fd, AGENTD_GIT_STEP_FILES);
    if (mount(source, r->workspace_target, NULL, MS_BIND, NULL) != 0) report(error_fd, AGENTD_GIT_STEP_BIND);
    close(workspace);
    if (chdir(r->workspace_target) != 0) report(error_fd, AGENTD_GIT_STEP_CHDIR);

    if (setgroups(0, NULL) != 0) report(error_fd, AGENTD_GIT_STEP_SETGROUPS);
    if (setresgid(r->real_gid, r->gid, r->gid) != 0) report(error_fd, AGENTD_GIT_STEP_SETGID);
    if (setresuid(r->uid, r->uid, r->uid) != 0) report(error_fd, AGENTD_GIT_STEP_SETUID);

    int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null_fd < 0 || dup2(null_fd, 0) < 0 || dup2(r->stdout_fd, 1) < 0 || dup2(r->stderr_fd, 2) < 0)
        report(error_fd, AGENTD_GIT_STEP_STDIO);
    // Nothing else of the parent's reaches git (the error pipe is close-on-exec already).
    if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
        for (int fd = 3; fd < 65536; fd++)
            if (fd != error_fd) close(fd);
    }
    execve(r->executable, r->argv, r->envp);
    report(error_fd, AGENTD_GIT_STEP_EXEC);
}

int agentd_git_spawn(const agentd_git_spawn_request *request, pid_t *pid, int *failed_step) {
    int error_pipe[2];
    if (pipe2(error_pipe, O_CLOEXEC) != 0) {
        *failed_step = AGENTD_GIT_STEP_FORK;
        return errno;
    }
    pid_t forked = fork();
    if (forked < 0) {
        int saved = errno;
        close(error_pipe[0]);
        close(error_pipe[1]);
        *failed_step = AGENTD_GIT_STEP_FORK;
        return saved;
    }
    if (forked == 0) {
        close(error_pipe[0]);
        child(request, error_pipe[1]);
    }
    close(error_pipe[1]);
    int message[2];
    ssize_t n;
    do { n = read(error_pipe[0], message, sizeof message); } while (n < 0 && errno == EINTR);
    close(error_pipe[0]);
    if (n == (ssize_t)sizeof message) {
        int status;
        while (waitpid(forked, &status, 0) < 0 && errno == EINTR) {}
        *failed_step = message[0];
        return message[1] != 0 ? message[1] : EIO;
    }
    *pid = forked;
    return 0;
}

int agentd_git_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

int agentd_git_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int agentd_git_open_directory(const char *path) { return open(path, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC); }
