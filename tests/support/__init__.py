"""What the tests share: servers, reference computations, waiting, external clients."""
