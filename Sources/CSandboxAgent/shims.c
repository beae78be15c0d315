#define _GNU_SOURCE
#include "CSandboxAgent.h"
#include <fcntl.h>
#include <sys/prctl.h>
#include <unistd.h>

int csa_accept_cloexec(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }
int csa_pipe2(int fds[2], int flags) { return pipe2(fds, flags); }
int csa_spawn_addchdir(posix_spawn_file_actions_t *actions, const char *path) {
    return posix_spawn_file_actions_addchdir_np(actions, path);
}
short csa_spawn_setsid_flag(void) { return POSIX_SPAWN_SETSID; }
int csa_become_subreaper(void) { return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); }
int csa_msg_nosignal(void) { return MSG_NOSIGNAL; }
