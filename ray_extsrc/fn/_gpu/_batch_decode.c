/* One batch of JPEGs decoded by nvImageCodec's C API in a single call, into device buffers the
 * caller owns: no Python object per sample, and (called through ctypes.CDLL) no GIL held while
 * the code streams are parsed and the batch decodes. See native_decode.py for why and how it is
 * built; the Python binding's decode (nvImageCodec's python/decoder.cpp) is the model for the
 * output image description (interleaved RGB, uint8, dense rows).
 *
 * Handles (code streams, images) are kept per decoder and reused from batch to batch
 * (nvimgcodec*Create reuses a handle that is not NULL). A decoder is used by one thread at a time.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nvimgcodec.h"

typedef struct {
    nvimgcodecInstance_t instance;
    nvimgcodecDecoder_t decoder;
    int capacity;
    nvimgcodecCodeStream_t* streams;
    nvimgcodecImage_t* images;
    nvimgcodecCodeStream_t* batch_streams;
    nvimgcodecImage_t* batch_images;
    nvimgcodecProcessingStatus_t* status;
    int* where;
} rx_decoder;

static void set_error(char* err, int errlen, const char* what, int code) {
    if (err && errlen > 0) snprintf(err, (size_t)errlen, "%s (nvImageCodec status %d)", what, code);
}

static void set_message(char* err, int errlen, const char* what) {
    if (err && errlen > 0) snprintf(err, (size_t)errlen, "%s", what);
}

/* A process-wide instance: extensions (nvJPEG, ...) are loaded once, and it lives as long as the
 * process (native_decode.library). Returns NULL on failure. */
void* rx_instance_create(char* err, int errlen) {
    nvimgcodecInstance_t instance = NULL;
    nvimgcodecInstanceCreateInfo_t info;
    memset(&info, 0, sizeof(info));
    info.struct_type = NVIMGCODEC_STRUCTURE_TYPE_INSTANCE_CREATE_INFO;
    info.struct_size = sizeof(info);
    info.load_builtin_modules = 1;
    info.load_extension_modules = 1;
    nvimgcodecStatus_t st = nvimgcodecInstanceCreate(&instance, &info);
    if (st != NVIMGCODEC_STATUS_SUCCESS) {
        set_error(err, errlen, "nvimgcodecInstanceCreate failed", (int)st);
        return NULL;
    }
    return instance;
}

/* A decoder on device_id with the given backends (kinds: nvimgcodecBackendKind_t values, with
 * their load hints; none = nvImageCodec's defaults) and options string. NULL on failure. */
void* rx_decoder_create(void* instance, int device_id, int max_cpu_threads, int num_backends, const int* kinds,
                        const float* load_hints, const char* options, char* err, int errlen) {
    nvimgcodecBackend_t backends[8];
    if (num_backends < 0 || num_backends > 8) {
        set_message(err, errlen, "too many backends (at most 8)");
        return NULL;
    }
    memset(backends, 0, sizeof(backends));
    for (int i = 0; i < num_backends; i++) {
        backends[i].struct_type = NVIMGCODEC_STRUCTURE_TYPE_BACKEND;
        backends[i].struct_size = sizeof(nvimgcodecBackend_t);
        backends[i].kind = (nvimgcodecBackendKind_t)kinds[i];
        backends[i].params.struct_type = NVIMGCODEC_STRUCTURE_TYPE_BACKEND_PARAMS;
        backends[i].params.struct_size = sizeof(nvimgcodecBackendParams_t);
        backends[i].params.load_hint = load_hints[i];
        backends[i].params.load_hint_policy = NVIMGCODEC_LOAD_HINT_POLICY_FIXED;
    }
    nvimgcodecExecutionParams_t exec;
    memset(&exec, 0, sizeof(exec));
    exec.struct_type = NVIMGCODEC_STRUCTURE_TYPE_EXECUTION_PARAMS;
    exec.struct_size = sizeof(exec);
    exec.device_id = device_id;
    exec.max_num_cpu_threads = max_cpu_threads;
    exec.num_backends = num_backends;
    exec.backends = num_backends ? backends : NULL;
    nvimgcodecDecoder_t decoder = NULL;
    nvimgcodecStatus_t st = nvimgcodecDecoderCreate((nvimgcodecInstance_t)instance, &decoder, &exec, options);
    if (st != NVIMGCODEC_STATUS_SUCCESS && options && options[0]) {
        decoder = NULL;  /* an option this version does not know: its defaults, as the Python path does */
        st = nvimgcodecDecoderCreate((nvimgcodecInstance_t)instance, &decoder, &exec, NULL);
    }
    if (st != NVIMGCODEC_STATUS_SUCCESS) {
        set_error(err, errlen, "nvimgcodecDecoderCreate failed", (int)st);
        return NULL;
    }
    rx_decoder* d = (rx_decoder*)calloc(1, sizeof(rx_decoder));
    if (!d) {
        nvimgcodecDecoderDestroy(decoder);
        set_message(err, errlen, "out of host memory");
        return NULL;
    }
    d->instance = (nvimgcodecInstance_t)instance;
    d->decoder = decoder;
    return d;
}

static void release_handles(rx_decoder* d) {
    for (int i = 0; i < d->capacity; i++) {
        if (d->images[i]) nvimgcodecImageDestroy(d->images[i]);
        if (d->streams[i]) nvimgcodecCodeStreamDestroy(d->streams[i]);
    }
    free(d->streams);
    free(d->images);
    free(d->batch_streams);
    free(d->batch_images);
    free(d->status);
    free(d->where);
    d->streams = NULL;
    d->images = NULL;
    d->batch_streams = NULL;
    d->batch_images = NULL;
    d->status = NULL;
    d->where = NULL;
    d->capacity = 0;
}

void rx_decoder_destroy(void* handle) {
    rx_decoder* d = (rx_decoder*)handle;
    if (!d) return;
    release_handles(d);
    nvimgcodecDecoderDestroy(d->decoder);
    free(d);
}

static int reserve(rx_decoder* d, int n) {
    if (n <= d->capacity) return 0;
    release_handles(d);
    d->streams = (nvimgcodecCodeStream_t*)calloc((size_t)n, sizeof(nvimgcodecCodeStream_t));
    d->images = (nvimgcodecImage_t*)calloc((size_t)n, sizeof(nvimgcodecImage_t));
    d->batch_streams = (nvimgcodecCodeStream_t*)calloc((size_t)n, sizeof(nvimgcodecCodeStream_t));
    d->batch_images = (nvimgcodecImage_t*)calloc((size_t)n, sizeof(nvimgcodecImage_t));
    d->status = (nvimgcodecProcessingStatus_t*)calloc((size_t)n, sizeof(nvimgcodecProcessingStatus_t));
    d->where = (int*)calloc((size_t)n, sizeof(int));
    if (!d->streams || !d->images || !d->batch_streams || !d->batch_images || !d->status || !d->where) {
        release_handles(d);
        return -1;
    }
    d->capacity = n;
    return 0;
}

/* Decode sample j (lengths[j] bytes at host address src[j]) as interleaved uint8 RGB into the
 * buffer dst[j] (rows of width*3 bytes; device memory, or host memory when host_buffers is 1),
 * expecting height hw[2j] and width hw[2j+1], on cuda_stream. result[j]: 1 decoded; 0
 * nvImageCodec could not decode it; -1 its code stream could not be parsed; -2 its size is not the
 * expected one (nothing written). Returns 0, or a negative value when the whole call failed (err
 * says why). */
int rx_decode(void* handle, int n, const uint64_t* src, const uint64_t* lengths, const uint64_t* dst,
              const int32_t* hw, int host_buffers, void* cuda_stream, int32_t* result, char* err, int errlen) {
    rx_decoder* d = (rx_decoder*)handle;
    if (reserve(d, n) != 0) {
        set_message(err, errlen, "out of host memory");
        return -1;
    }
    int m = 0;
    for (int j = 0; j < n; j++) {
        result[j] = -1;
        nvimgcodecStatus_t st = nvimgcodecCodeStreamCreateFromHostMem(
            d->instance, &d->streams[j], (const unsigned char*)(uintptr_t)src[j], (size_t)lengths[j], NULL);
        if (st != NVIMGCODEC_STATUS_SUCCESS) {
            if (d->streams[j]) {  /* a reused handle in an unknown state: start the next batch afresh */
                nvimgcodecCodeStreamDestroy(d->streams[j]);
                d->streams[j] = NULL;
            }
            continue;
        }
        nvimgcodecImageInfo_t info;
        memset(&info, 0, sizeof(info));
        info.struct_type = NVIMGCODEC_STRUCTURE_TYPE_IMAGE_INFO;
        info.struct_size = sizeof(info);
        if (nvimgcodecCodeStreamGetImageInfo(d->streams[j], &info) != NVIMGCODEC_STATUS_SUCCESS) continue;
        uint32_t h = info.plane_info[0].height, w = info.plane_info[0].width;
        if ((int64_t)h != hw[2 * j] || (int64_t)w != hw[2 * j + 1]) {
            result[j] = -2;
            continue;
        }
        info.struct_next = NULL;
        info.sample_format = NVIMGCODEC_SAMPLEFORMAT_I_RGB;
        info.color_spec = NVIMGCODEC_COLORSPEC_SRGB;
        info.chroma_subsampling = NVIMGCODEC_SAMPLING_NONE;
        info.num_planes = 1;
        info.plane_info[0].height = h;
        info.plane_info[0].width = w;
        info.plane_info[0].num_channels = 3;
        info.plane_info[0].row_stride = (size_t)w * 3;
        info.plane_info[0].sample_type = NVIMGCODEC_SAMPLE_DATA_TYPE_UINT8;
        info.plane_info[0].precision = 0;
        info.buffer = (void*)(uintptr_t)dst[j];
        info.buffer_kind = host_buffers ? NVIMGCODEC_IMAGE_BUFFER_KIND_STRIDED_HOST : NVIMGCODEC_IMAGE_BUFFER_KIND_STRIDED_DEVICE;
        info.cuda_stream = (cudaStream_t)cuda_stream;
        st = nvimgcodecImageCreate(d->instance, &d->images[j], &info);
        if (st != NVIMGCODEC_STATUS_SUCCESS) {
            if (d->images[j]) {
                nvimgcodecImageDestroy(d->images[j]);
                d->images[j] = NULL;
            }
            result[j] = 0;
            continue;
        }
        result[j] = 0;
        d->batch_streams[m] = d->streams[j];
        d->batch_images[m] = d->images[j];
        d->where[m] = j;
        m++;
    }
    if (m == 0) return 0;
    nvimgcodecDecodeParams_t params;
    memset(&params, 0, sizeof(params));
    params.struct_type = NVIMGCODEC_STRUCTURE_TYPE_DECODE_PARAMS;
    params.struct_size = sizeof(params);
    params.apply_exif_orientation = 0;  /* as the CPU path (libjpeg-turbo) */
    nvimgcodecFuture_t future = NULL;
    nvimgcodecStatus_t st = nvimgcodecDecoderDecode(d->decoder, d->batch_streams, d->batch_images, m, &params, &future);
    if (st != NVIMGCODEC_STATUS_SUCCESS) {
        set_error(err, errlen, "nvimgcodecDecoderDecode failed", (int)st);
        return -1;
    }
    st = nvimgcodecFutureWaitForAll(future);
    size_t got = 0;
    if (st == NVIMGCODEC_STATUS_SUCCESS) st = nvimgcodecFutureGetProcessingStatus(future, d->status, &got);
    nvimgcodecFutureDestroy(future);
    if (st != NVIMGCODEC_STATUS_SUCCESS) {
        set_error(err, errlen, "waiting for nvimgcodecDecoderDecode failed", (int)st);
        return -1;
    }
    for (int i = 0; i < m && (size_t)i < got; i++) {
        if (d->status[i] == NVIMGCODEC_PROCESSING_STATUS_SUCCESS) result[d->where[i]] = 1;
    }
    return 0;
}
