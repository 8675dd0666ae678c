"""Layer-axis methods: which layers keep their full context."""
