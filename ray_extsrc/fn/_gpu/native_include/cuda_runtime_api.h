/* The one CUDA runtime name nvimgcodec.h needs (an opaque stream handle), so that the batch
 * decoder (_batch_decode.c) builds where only the nvImageCodec wheel is installed, without a
 * CUDA toolkit. Same definition as CUDA's own driver_types.h. */
#ifndef RAY_EXTSRC_CUDA_RUNTIME_API_STUB
#define RAY_EXTSRC_CUDA_RUNTIME_API_STUB
#include <stddef.h> /* ptrdiff_t, which the real header brings */
typedef struct CUstream_st* cudaStream_t;
#endif
