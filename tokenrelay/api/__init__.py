"""The stateless HTTP side of tokenrelay."""
