"""Tests of the emulated kernel: SA/policy records, SAD, SPD and PF_KEY semantics."""
