"""How bytes reach the disk (or an object store) durably, and how a staged checkpoint is published."""
