"""The local control API: the gRPC servicer, the client the CLI uses, proto conversion, generated code."""
