"""Generated stubs of the Open Inference Protocol (package inference); see make proto."""
