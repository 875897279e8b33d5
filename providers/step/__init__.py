"""StepChat (yuewen.cn): PROTOCOLS.md section 2."""
