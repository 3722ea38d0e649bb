# Sourced by the GPU scripts: puts the CUDA libraries that quantizer-job
# loads at run time (libcuda, NVRTC, cuBLAS, cuSOLVER) on LD_LIBRARY_PATH,
# wherever this machine keeps them (driver, toolkit, PyTorch's nvidia wheels).
for lib in libnvrtc.so.13 libcublas.so.13 libcusolver.so.12 libcuda.so.1; do
    if ! ldconfig -p | grep -q "$lib"; then
        dir=$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "$lib" -print 2>/dev/null | head -1)
        [ -n "$dir" ] && LD_LIBRARY_PATH="$(dirname "$dir")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
done
export LD_LIBRARY_PATH
