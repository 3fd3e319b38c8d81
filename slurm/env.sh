# NCCL / InfiniBand / NVLink settings for DGX-class nodes (8 GPUs on NVSwitch, 8 IB NICs).
# Sourced by slurm/common.sh when GPUS_PER_NODE > 0; every value is a default that an
# exported variable of the same name overrides (NCCL_ENV=other.sh or "" replaces the file).
#
# How to check a setting: run nccl-tests (https://github.com/NVIDIA/nccl-tests) on the same
# nodes with the same environment, and read NCCL's own report (NCCL_DEBUG=INFO):
#   git clone https://github.com/NVIDIA/nccl-tests && make -C nccl-tests MPI=1 CUDA_HOME=$CUDA_HOME
#   source slurm/env.sh
#   srun -N 2 --ntasks-per-node=8 --gpus-per-node=8 --mpi=pmix nccl-tests/build/all_reduce_perf -b 8M -e 8G -f 2 -g 1
# Read the "busbw" column at the largest sizes. One DGX H100 node (NVLink 4 + NVSwitch) gives
# roughly 350-480 GB/s; across nodes with 8 x 400 Gb/s NDR it is bound by the network at
# roughly 350-400 GB/s. Far less across nodes means NCCL fell back to TCP sockets or to
# fewer NICs: look for "NET/IB" (good) versus "NET/Socket" (bad) in the NCCL_DEBUG=INFO lines.
# Then `srun -N 2 ... python -m vlm_dist.dist --selftest` checks the same path through PyTorch.

# --- logging
# WARN prints only problems. INFO prints the chosen transports, NICs and rings/trees at
# start-up: set it when checking a new cluster (NCCL_DEBUG_SUBSYS=INIT,NET narrows it).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# --- InfiniBand between nodes
# Which HCAs NCCL may use. "mlx5" is a prefix matching every ConnectX port; list the compute
# rails explicitly (e.g. "=mlx5_0,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_9,mlx5_10,mlx5_11" on a
# DGX H100) to keep NCCL off the storage NICs. Check: `ibstat` / `ibv_devinfo` list the ports
# (State: Active, Rate: 400); NCCL_DEBUG=INFO prints "NET/IB : Using [0]mlx5_0:1/IB ...".
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}
# InfiniBand retry timeout, 4.096 us * 2^N (NCCL's default is 20, ~4 s). 22 (~17 s) rides out
# transient fabric congestion instead of failing the job. Check: NCCL_DEBUG=INFO echoes it.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# GPUDirect RDMA: NICs read and write GPU memory directly when they share a PCIe switch
# (PHB or closer). Check: NCCL_DEBUG=INFO lines say "GDRDMA" for each channel; if they do not,
# the nvidia-peermem module is missing (`lsmod | grep peermem`).
export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB}
# Only on RoCE (Ethernet) fabrics: the GID index carrying RoCE v2, usually 3. Check with
# `show_gids`. Unset on native InfiniBand.
# export NCCL_IB_GID_INDEX=3

# --- NVLink inside a node
# NVLink SHARP (in-switch reductions on NVSwitch 3, H100/H200): faster intra-node all-reduce.
# NCCL >= 2.17 enables it when the fabric manager supports it; 0 turns it off if it fails to
# initialise. Check: NCCL_DEBUG=INFO prints "NVLS" in the algorithm list; all_reduce_perf
# busbw on one node rises above ~400 GB/s with it.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-1}
# Peer-to-peer between GPUs of a node over NVLink (NVL) only, never through host PCIe.
# Check: `nvidia-smi topo -m` shows NV18 between every GPU pair on a DGX H100.
export NCCL_P2P_LEVEL=${NCCL_P2P_LEVEL:-NVL}

# --- sockets (bootstrap, and gloo for vlm_dist's per-step health check)
# Interfaces for NCCL's bootstrap and socket fallback: exclude loopback and container bridges.
# Check: `ip -br addr`; NCCL_DEBUG=INFO prints "Bootstrap : Using eth0:10.x.x.x".
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker,virbr}
# Gloo takes one interface name (no "^" syntax); by default it uses the address the hostname
# resolves to. Set it when that is the wrong network, e.g. GLOO_SOCKET_IFNAME=ib0 or eth0.
# export GLOO_SOCKET_IFNAME=eth0

# --- failure handling in PyTorch (a job must end, not hang)
# A failed or timed-out collective aborts the process, so srun --kill-on-bad-exit ends the
# job; the log says "[Rank r] Watchdog caught collective operation timeout".
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# On a timeout, dump the flight recorder (the last collectives each rank issued) to
# TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank>: comparing the files shows which rank fell behind.
# Check: python -m torch.distributed.flight_recorder.fr_trace <dir> (torch >= 2.5).
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-/tmp/nccl_trace_${SLURM_JOB_ID:-0}_rank_}

# --- CUDA memory
# Fewer fragmentation OOMs with variable-length packed batches.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
