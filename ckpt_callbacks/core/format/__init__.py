"""What is on disk: names, the manifest, and the engines that turn state into files and back."""
