"""What the ServerApp and the ClientApp say to each other (`wire.protocol`)."""
