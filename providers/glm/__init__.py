"""ChatGLM (chatglm.cn): PROTOCOLS.md section 3."""
