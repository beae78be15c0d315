// SessionLog — see the module's README.
