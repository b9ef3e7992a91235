"""What runs inside a sandbox's boundary on Shuttle's behalf: the guest agent."""
