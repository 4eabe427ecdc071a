"""Device draft service: owns the speculative loop of its sessions and talks to verifiers over NATS."""
