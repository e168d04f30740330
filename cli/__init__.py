"""The dicomnode command line and composition root."""
