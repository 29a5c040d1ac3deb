"""The worker side of tokenrelay: claims runs, executes graphs, publishes their events."""
