"""Long-lived sandboxes on this node: the boundary, its guest agent, and the link to it."""
