"""`python -m ds_lab.comm`: the nccl-tests bus-bandwidth factors for n = 2..8."""
from ds_lab.comm import bus_factor

for n in range(2, 9):
    print(n, {op: round(bus_factor(op, n), 3) for op in ("all_reduce", "all_gather", "broadcast")})
