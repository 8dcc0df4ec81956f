"""K-FAC / SP-NGD natural-gradient preconditioner and optimizer (pure torch)."""
