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
#endif
