"""Scheduler: takes prompts from the durable `draftwire.prompts` queue and runs each on a draft instance."""
