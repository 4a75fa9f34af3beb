"""Benchmark clients, peers and roofline sampling. The product never imports this package."""
