// EngineAPI — see the module's README.
