"""Device placement: ``num_device_layers`` (layers per device) and ``tensor_parallel`` (a mesh)."""
