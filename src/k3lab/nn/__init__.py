"""Pure-torch modules: no Lightning, no config objects, typed constructor arguments."""
