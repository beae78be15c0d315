// Policy — see the module's README.
