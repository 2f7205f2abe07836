"""Server side, Flower glue: the ServerApp and the strategy that hands replies to the round engine."""
