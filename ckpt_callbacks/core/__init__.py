"""Framework-neutral checkpoint core: no transformers or Lightning import below this package."""
