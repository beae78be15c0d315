// SystemdBus — see the module's README.
