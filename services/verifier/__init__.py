"""Edge verifier service: the target model behind `draftwire.verify` (queue group) and a per-instance subject."""
