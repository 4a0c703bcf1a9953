"""The runtime: executables built by a backend, run on NumPy arrays."""

from kiln.runtime.executable import Executable

__all__ = ["Executable"]
