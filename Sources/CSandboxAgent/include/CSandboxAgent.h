#ifndef CSANDBOXAGENT_H
#define CSANDBOXAGENT_H
#include <spawn.h>
#include <sys/socket.h>

/// GNU extensions the Swift Glibc module does not import (it is built without _GNU_SOURCE).
int csa_accept_cloexec(int fd);
int csa_pipe2(int fds[2], int flags);
int csa_spawn_addchdir(posix_spawn_file_actions_t *actions, const char *path);
/// POSIX_SPAWN_SETSID (glibc 2.26).
short csa_spawn_setsid_flag(void);
/// prctl(PR_SET_CHILD_SUBREAPER, 1): orphans below this process become its children.
int csa_become_subreaper(void);
/// MSG_NOSIGNAL: send() on a socket whose peer is gone fails with EPIPE instead of raising SIGPIPE.
int csa_msg_nosignal(void);
#endif
