"""Control: the supervisor, the worker roles, the command pipe, notify, status and metrics."""
