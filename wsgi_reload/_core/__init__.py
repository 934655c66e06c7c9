"""Change detection: the scanner, file events, the settle window, the gate and the watcher that runs them."""
