"""Redis side of tokenrelay, shared by the API and the worker."""
