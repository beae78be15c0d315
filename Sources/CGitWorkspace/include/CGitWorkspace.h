#ifndef CGITWORKSPACE_H
#define CGITWORKSPACE_H
#include <stddef.h>
#include <sys/types.h>

/// A file or directory made in the child's private scratch tmpfs before it drops privileges.
typedef struct {
    /// Absolute path inside the scratch tmpfs; a directory must come before what it holds.
    const char *path;
    /// The contents, or NULL for a directory.
    const char *data;
    size_t length;
    unsigned mode;
} agentd_git_file;

/// What `agentd_git_spawn` runs, and as whom.
typedef struct {
    /// Absolute path of the program (resolved by the caller: nothing is looked up on PATH).
    const char *executable;
    char *const *argv;
    char *const *envp;
    /// The workspace's host path, opened again in the child's namespace (a mount of the
    /// caller's namespace cannot be bind-mounted from another), before the tmpfs may hide it.
    const char *workspace_path;
    /// A directory descriptor of the workspace (O_PATH is enough), open in the caller: what
    /// `workspace_path` must still be (same device and inode). The child closes it.
    int workspace_fd;
    /// Where the private tmpfs is mounted (in the child's mount namespace only).
    const char *scratch;
    /// Inside `scratch`: where the workspace is bind-mounted; the child's working directory.
    const char *workspace_target;
    const agentd_git_file *files;
    size_t file_count;
    /// The real, effective, saved and filesystem uid.
    unsigned uid;
    /// The effective, saved and filesystem gid: what files are created with.
    unsigned gid;
    /// The real gid, different from `gid`: it makes the process non-dumpable, so that other
    /// processes of `uid` can neither ptrace it nor read its /proc/<pid>/environ.
    unsigned real_gid;
    /// Descriptors the child's stdout and stderr are dup2'd from (stdin is /dev/null).
    int stdout_fd;
    int stderr_fd;
} agentd_git_spawn_request;

/// The steps of the child before exec, as reported in `*failed_step`.
enum {
    AGENTD_GIT_STEP_FORK = 1,
    AGENTD_GIT_STEP_SETSID,
    AGENTD_GIT_STEP_UNSHARE,
    AGENTD_GIT_STEP_PRIVATE,
    AGENTD_GIT_STEP_REOPEN,
    AGENTD_GIT_STEP_TMPFS,
    AGENTD_GIT_STEP_FILES,
    AGENTD_GIT_STEP_BIND,
    AGENTD_GIT_STEP_CHDIR,
    AGENTD_GIT_STEP_SETGROUPS,
    AGENTD_GIT_STEP_SETGID,
    AGENTD_GIT_STEP_SETUID,
    AGENTD_GIT_STEP_STDIO,
    AGENTD_GIT_STEP_EXEC,
};

/// Forks a child that, in a session of its own (its pid is its process group) and a private
/// mount namespace, mounts a tmpfs on `scratch`, makes `files` there, bind-mounts the
/// workspace at `workspace_target` (failing with ESTALE if `workspace_path` is no longer the
/// directory of `workspace_fd`), changes into it, drops to `uid`/`gid` with no
/// supplementary groups, and execs `executable`. Returns 0 with `*pid` set, or an errno with
/// `*failed_step` saying which step failed (the child is reaped then).
int agentd_git_spawn(const agentd_git_spawn_request *request, pid_t *pid, int *failed_step);

/// pidfd_open(2): a descriptor that polls readable when `pid` exits.
int agentd_git_pidfd_open(pid_t pid);

/// open(path, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC): a directory, not through a
/// symlink, held without reading it.
int agentd_git_open_directory(const char *path);

/// pipe2(fds, O_CLOEXEC).
int agentd_git_pipe_cloexec(int fds[2]);
#endif
