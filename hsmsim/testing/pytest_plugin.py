"""The `hsmsim` pytest plugin (registered through the pytest11 entry point): fixtures that start
a throw-away cluster for users' tests."""
