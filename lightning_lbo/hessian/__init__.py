"""Hessian spectrum tools: HVPs, top eigenvalues, trace, density (pure torch)."""
