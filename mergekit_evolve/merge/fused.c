/* Fused elementwise merge kernels for the CPU fast path (mergekit_evolve/merge/fused.py).
 *
 * Each function does, for every element of [begin, end), exactly the arithmetic that
 * fastpath.py's chain of torch operations does (which tests/test_merge_fastpath.py proves equal
 * to mergekit's kernels), in one pass instead of one pass per operation: every float32
 * operation below is one IEEE operation rounded once (built with -ffp-contract=off, no fast-math:
 * no reassociation, and a fused multiply-add only where torch's own kernel has one: linear_fma),
 * and every bfloat16 operation is torch's: widen to
 * float32, operate, round to nearest even (which NaN a NaN result is may differ: see
 * round_bf16). tests/test_merge_fused.py checks each kernel against those torch operations bit
 * for bit, edge values included.
 *
 * dtype codes: 0 = float32, 1 = bfloat16. Return value: 1 if every output element is finite.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#define DT_F32 0
#define DT_BF16 1
#define BLOCK 256
#define MAX_ENTRIES 4

/* Every kernel is written once for a dtype argument and instantiated per dtype (the dtype is
 * a constant in each instance, so each loop compiles to straight vector code). */
#define SPECIALIZE static inline __attribute__((always_inline))
/* On x86-64 each exported kernel is also built for AVX-512 (x86-64-v4) and AVX2 and picked at
 * load time by the CPU it runs on (wider vectors; the same IEEE operations, so the same bits). */
#if defined(__x86_64__) && defined(__GNUC__)
#define EXPORTED __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define EXPORTED
#endif

static inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

/* torch's round_to_nearest_even (c10/util/BFloat16.h): NaN becomes a quiet NaN. Bit operations
 * only, no branch or select, so that every loop using it vectorises. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (uint32_t)0 - (uint32_t)((u & 0x7fffffffu) > 0x7f800000u);
    return (uint16_t)((rounded & ~nan) | (0x7fc0u & nan));
}

/* f32_to_bf16 then back to float32, kept in 32-bit lanes (no narrowing to 16 bits and back).
 * Without torch's NaN canonicalisation: every NaN these kernels can meet has its low 16 bits
 * clear (the hardware's default NaN, or one propagated from a bfloat16 input; the float32
 * constants are finite), so adding the rounding bias leaves it a NaN; only which NaN may differ
 * from torch's, and a candidate with a NaN is rejected anyway. Half the operations per rounding
 * in kernels that round after every operation. */
static inline float round_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    return bits_to_f32((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}

/* A float32 value rounded to the representable values of dtype (a no-op for float32). */
SPECIALIZE float round_to(float x, int dtype) { return dtype == DT_BF16 ? round_bf16(x) : x; }

SPECIALIZE float load(const void *data, int dtype, int64_t j) {
    return dtype == DT_BF16 ? bf16_to_f32(((const uint16_t *)data)[j]) : ((const float *)data)[j];
}

/* Stores values[0..size) at out[start..) in dtype (rounding float32 to bfloat16 as torch does,
 * unless the caller says they are ``rounded`` already)
 * and returns 1 if any stored value is not finite. With stream, a whole aligned block goes out
 * with non-temporal stores: an output larger than the cache is not read again soon, and a normal
 * store would first read each line it writes (a third more memory traffic for a merge). */
SPECIALIZE int store_block(void *out, const int dtype, int64_t start, const float *values, int64_t size,
                           int stream, const int rounded) {
    int bad = 0;
    if (dtype == DT_BF16) {
        uint16_t packed[BLOCK], *o = (uint16_t *)out + start;
        if (rounded) /* already bfloat16 values: their upper halves */
            for (int64_t k = 0; k < size; k++) packed[k] = (uint16_t)(f32_to_bits(values[k]) >> 16);
        else
            for (int64_t k = 0; k < size; k++) packed[k] = f32_to_bf16(values[k]);
        for (int64_t k = 0; k < size; k++) bad |= (packed[k] & 0x7f80u) == 0x7f80u;
#if defined(__SSE2__)
        if (stream && size == BLOCK && ((uintptr_t)o & 15) == 0) {
            for (int64_t k = 0; k < size; k += 8) _mm_stream_si128((__m128i *)(o + k), _mm_loadu_si128((__m128i *)(packed + k)));
            return bad;
        }
#endif
        memcpy(o, packed, size * sizeof(uint16_t));
        return bad;
    }
    float *o = (float *)out + start;
    for (int64_t k = 0; k < size; k++) bad |= (f32_to_bits(values[k]) & 0x7f800000u) == 0x7f800000u;
#if defined(__SSE2__)
    if (stream && size == BLOCK && ((uintptr_t)o & 15) == 0) {
        for (int64_t k = 0; k < size; k += 4) _mm_stream_ps(o + k, _mm_loadu_ps(values + k));
        return bad;
    }
#endif
    memcpy(o, values, size * sizeof(float));
    return bad;
}

/* Streaming stores are weakly ordered: fence them before the caller reads the output. */
static inline void fence_streaming_stores(void) {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

/* Ranges at least this long (256 KB of float32) are written with streaming stores: a merged tensor
 * is not read again before the whole model is written. */
#define STREAM_MIN_ELEMENTS (1 << 16)
/* Outputs that are read again right away stream only from this size (32 MB of float32). */
#define STREAM_REREAD_MIN_ELEMENTS (1 << 23)

/* ------------------------------------------------------------------------------------- linear
 * mergekit's linear_merge per element: acc = +0; acc = acc + source_i * coefficient_i (float32,
 * torch's addcmul_); acc = acc / denominator (when normalize); out = acc cast to the dtype.
 * Whether torch's addcmul_ rounds the product before adding depends on how torch was built for
 * this CPU (its AVX2/AVX512 kernels fuse them into one FMA), so there are two versions; fused.py
 * asks torch which one it computes before using either. One pass per element, instantiated per
 * source count (up to MAX_LINEAR_UNROLLED; more sources accumulate block by block). */
#define MAX_LINEAR_UNROLLED 4

SPECIALIZE float multiply_add(float x, float c, float acc, const int fused) {
    return fused ? fmaf(x, c, acc) : acc + x * c;
}

SPECIALIZE int linear_as(const int fused, const int dtype, const int n, const int normalize,
                         const void *const *sources, const float *coefficients, float denominator, void *out,
                         int64_t begin, int64_t end) {
    int bad = 0;
    const int stream = end - begin >= STREAM_MIN_ELEMENTS;
    const int unrolled = n <= MAX_LINEAR_UNROLLED;
    for (int64_t start = begin; start < end; start += BLOCK) {
        const int64_t size = start + BLOCK < end ? BLOCK : end - start;
        float acc[BLOCK];
        if (unrolled) {
            for (int64_t k = 0; k < size; k++) {
                float a = 0.0f;
                for (int i = 0; i < n; i++) a = multiply_add(load(sources[i], dtype, start + k), coefficients[i], a, fused);
                acc[k] = normalize ? a / denominator : a;
            }
        } else {
            for (int64_t k = 0; k < size; k++) acc[k] = 0.0f;
            for (int i = 0; i < n; i++)
                for (int64_t k = 0; k < size; k++)
                    acc[k] = multiply_add(load(sources[i], dtype, start + k), coefficients[i], acc[k], fused);
            if (normalize)
                for (int64_t k = 0; k < size; k++) acc[k] = acc[k] / denominator;
        }
        bad |= store_block(out, dtype, start, acc, size, stream, 0);
    }
    fence_streaming_stores();
    return !bad;
}

#define LINEAR_ARGS sources, coefficients, denominator, out, begin, end
#define LINEAR_FOR(FUSED, DTYPE, N)                                                                          \
    (normalize ? linear_as(FUSED, DTYPE, N, 1, LINEAR_ARGS) : linear_as(FUSED, DTYPE, N, 0, LINEAR_ARGS))
#define LINEAR_DISPATCH(FUSED, DTYPE)                                                                        \
    switch (n) {                                                                                             \
    case 1: return LINEAR_FOR(FUSED, DTYPE, 1);                                                              \
    case 2: return LINEAR_FOR(FUSED, DTYPE, 2);                                                              \
    case 3: return LINEAR_FOR(FUSED, DTYPE, 3);                                                              \
    case 4: return LINEAR_FOR(FUSED, DTYPE, 4);                                                              \
    default: return (normalize ? linear_as(FUSED, DTYPE, n, 1, LINEAR_ARGS)                                  \
                               : linear_as(FUSED, DTYPE, n, 0, LINEAR_ARGS));                                \
    }

EXPORTED int linear(int dtype, int n, const void *const *sources, const float *coefficients, int normalize,
                    float denominator, void *out, int64_t begin, int64_t end) {
    if (dtype == DT_BF16) { LINEAR_DISPATCH(0, DT_BF16) }
    LINEAR_DISPATCH(0, DT_F32)
}

#if defined(__x86_64__)
/* float32 with fused multiply-adds on AVX2, the common case, written with intrinsics: the
 * vectorised C above stages each block in a buffer before its streaming stores (128-bit, as
 * portable code must), which costs it about a third of memory speed here. Same operations. */
__attribute__((target("avx2,fma"))) SPECIALIZE int linear_f32_avx2(const int n, const int normalize,
                                                                   const void *const *sources,
                                                                   const float *coefficients, float denominator,
                                                                   float *out, int64_t begin, int64_t end) {
    const float *source[MAX_LINEAR_UNROLLED];
    __m256 coefficient[MAX_LINEAR_UNROLLED];
    for (int i = 0; i < n; i++) {
        source[i] = (const float *)sources[i];
        coefficient[i] = _mm256_set1_ps(coefficients[i]);
    }
    const __m256 divide_by = _mm256_set1_ps(denominator);
    const __m256i exponent = _mm256_set1_epi32(0x7f800000);
    const int stream = end - begin >= STREAM_MIN_ELEMENTS && ((uintptr_t)(out + begin) & 31) == 0;
    __m256i not_finite = _mm256_setzero_si256();
    int64_t j = begin;
    for (; j + 8 <= end; j += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int i = 0; i < n; i++) a = _mm256_fmadd_ps(_mm256_loadu_ps(source[i] + j), coefficient[i], a);
        if (normalize) a = _mm256_div_ps(a, divide_by);
        __m256i bits = _mm256_and_si256(_mm256_castps_si256(a), exponent);
        not_finite = _mm256_or_si256(not_finite, _mm256_cmpeq_epi32(bits, exponent));
        if (stream)
            _mm256_stream_ps(out + j, a);
        else
            _mm256_storeu_ps(out + j, a);
    }
    int bad = _mm256_movemask_epi8(not_finite) != 0;
    for (; j < end; j++) {
        float a = 0.0f;
        for (int i = 0; i < n; i++) a = fmaf(source[i][j], coefficients[i], a);
        out[j] = normalize ? a / denominator : a;
        bad |= (f32_to_bits(out[j]) & 0x7f800000u) == 0x7f800000u;
    }
    _mm_sfence();
    return !bad;
}

#define LINEAR_F32_AVX2(N)                                                                                   \
    (normalize ? linear_f32_avx2(N, 1, sources, coefficients, denominator, (float *)out, begin, end)        \
               : linear_f32_avx2(N, 0, sources, coefficients, denominator, (float *)out, begin, end))
#endif

#if defined(__x86_64__)
/* Built for FMA hardware only inside this function; fused.py calls it only where has_fma(). */
__attribute__((target("avx2,fma")))
#endif
int linear_fma(int dtype, int n, const void *const *sources, const float *coefficients, int normalize,
               float denominator, void *out, int64_t begin, int64_t end) {
    if (dtype == DT_BF16) { LINEAR_DISPATCH(1, DT_BF16) }
#if defined(__x86_64__)
    switch (n) {
    case 1: return LINEAR_F32_AVX2(1);
    case 2: return LINEAR_F32_AVX2(2);
    case 3: return LINEAR_F32_AVX2(3);
    case 4: return LINEAR_F32_AVX2(4);
    }
#endif
    LINEAR_DISPATCH(1, DT_F32)
}

/* Batches: every thread of fused.py's pool calls the batch function with the same job array and
 * counter, and each takes the next job not taken yet until none is left. A thread that starts
 * late (woken late, or its core busy with something else a while: torch's idle OpenMP threads
 * spin for a time after each parallel operation) takes fewer jobs instead of finishing last. */
static inline int next_job(int32_t *counter) { return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }

/* A batch of linear merges in one call: a candidate's tensors of one recipe (fused.py's
 * LinearBatch) without a call, a thread hand-off and the Python between them per tensor. Each job
 * is one piece [begin, end) of one tensor, with linear()'s arguments; finite: written here. */
typedef struct {
    int32_t dtype;
    int32_t n;
    int32_t normalize;
    float denominator;
    const void *const *sources;
    const float *coefficients;
    void *out;
    int64_t begin;
    int64_t end;
    int32_t finite;
} LinearJob;

int linear_batch(int fma, LinearJob *jobs, int count, int32_t *counter) {
    for (int i; (i = next_job(counter)) < count;) {
        LinearJob *job = &jobs[i];
        const int finite = fma ? linear_fma(job->dtype, job->n, job->sources, job->coefficients, job->normalize,
                                            job->denominator, job->out, job->begin, job->end)
                               : linear(job->dtype, job->n, job->sources, job->coefficients, job->normalize,
                                        job->denominator, job->out, job->begin, job->end);
        if (finite < 0) return finite;
        job->finite = finite;
    }
    return 1;
}

int has_fma(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 1; /* ARMv8 and later always have a fused multiply-add */
#endif
}

/* --------------------------------------------------------------------- sparsified task vectors */
/* v if lo <= key < hi, else +0: a bit mask, not a branch (random keeps would mispredict). */
SPECIALIZE float keep_or_zero(float v, int32_t key, int32_t lo, int32_t hi) {
    uint32_t keep = (uint32_t)0 - (uint32_t)((key >= lo) & (key < hi));
    return bits_to_f32(f32_to_bits(v) & keep);
}

/* Keys are int32 (ranks; the bits of float32 uniform draws) or, with key16, uint16 (the high
 * halves of those draws' bits: all DARE compares them with where the density is a bfloat16
 * value, whose low 16 bits are zero; fastpath.py's UniformStream). key16 is a constant in each
 * instance, so each loop reads one width. */
SPECIALIZE int32_t key_at(const void *keys, const int key16, int64_t j) {
    return key16 ? (int32_t)((const uint16_t *)keys)[j] : ((const int32_t *)keys)[j];
}


/* Phase one of a rescaled sparsifier: masked = keep ? (source - base) : +0, in dtype, and its
 * magnitudes |masked| (which torch then sums, in its own order, for the l1 rescale). */
SPECIALIZE void mask_task_vector_as(const int dtype, const void *source, const void *base, const void *keys,
                                    const int key16, int32_t key_lo, int32_t key_hi, void *masked,
                                    void *magnitudes, int64_t begin, int64_t end) {
    /* both are read again at once (the sum, phase two): streamed only when far past the cache */
    const int stream = end - begin >= STREAM_REREAD_MIN_ELEMENTS;
    for (int64_t start = begin; start < end; start += BLOCK) {
        const int64_t size = start + BLOCK < end ? BLOCK : end - start;
        float m[BLOCK], a[BLOCK];
        for (int64_t k = 0; k < size; k++) {
            int64_t j = start + k;
            m[k] = keep_or_zero(round_to(load(source, dtype, j) - load(base, dtype, j), dtype), key_at(keys, key16, j),
                                key_lo, key_hi);
            a[k] = bits_to_f32(f32_to_bits(m[k]) & 0x7fffffffu);
        }
        store_block(masked, dtype, start, m, size, stream, 1);
        store_block(magnitudes, dtype, start, a, size, stream, 1);
    }
    fence_streaming_stores();
}

#define MASK_ARGS(KEY16) source, base, keys, KEY16, key_lo, key_hi, masked, magnitudes, begin, end
EXPORTED int mask_task_vector(int dtype, const void *source, const void *base, const void *keys, int key16,
                              int32_t key_lo, int32_t key_hi, void *masked, void *magnitudes, int64_t begin,
                              int64_t end) {
    if (dtype == DT_BF16 && key16)
        mask_task_vector_as(DT_BF16, MASK_ARGS(1));
    else if (dtype == DT_BF16)
        mask_task_vector_as(DT_BF16, MASK_ARGS(0));
    else if (key16)
        mask_task_vector_as(DT_F32, MASK_ARGS(1));
    else
        mask_task_vector_as(DT_F32, MASK_ARGS(0));
    return 1;
}

/* Phase one of a rescaled sparsifier when the task vector (source - base, rounded to dtype) is
 * stored: magnitudes = keep ? |tv| : +0, on the bits (no arithmetic at all). Phase two then
 * takes the masked vector's values from the task vector's signs and these magnitudes (entry
 * kind 4), so the masked vector is never written. */
SPECIALIZE void masked_magnitudes_as(const int dtype, const void *tv, const void *keys, const int key16, int32_t key_lo,
                                     int32_t key_hi, void *magnitudes, int64_t begin, int64_t end) {
    if (dtype == DT_BF16) {
        const uint16_t *t = (const uint16_t *)tv;
        uint16_t *m = (uint16_t *)magnitudes;
        for (int64_t j = begin; j < end; j++) {
            const int32_t key = key_at(keys, key16, j);
            m[j] = (uint16_t)(t[j] & 0x7fffu & -(uint16_t)((key >= key_lo) & (key < key_hi)));
        }
    } else {
        const uint32_t *t = (const uint32_t *)tv;
        uint32_t *m = (uint32_t *)magnitudes;
        for (int64_t j = begin; j < end; j++) {
            const int32_t key = key_at(keys, key16, j);
            m[j] = t[j] & 0x7fffffffu & ((uint32_t)0 - (uint32_t)((key >= key_lo) & (key < key_hi)));
        }
    }
}

#define MAGNITUDES_ARGS(KEY16) tv, keys, KEY16, key_lo, key_hi, magnitudes, begin, end
EXPORTED int masked_magnitudes(int dtype, const void *tv, const void *keys, int key16, int32_t key_lo,
                               int32_t key_hi, void *magnitudes, int64_t begin, int64_t end) {
    if (dtype == DT_BF16 && key16)
        masked_magnitudes_as(DT_BF16, MAGNITUDES_ARGS(1));
    else if (dtype == DT_BF16)
        masked_magnitudes_as(DT_BF16, MAGNITUDES_ARGS(0));
    else if (key16)
        masked_magnitudes_as(DT_F32, MAGNITUDES_ARGS(1));
    else
        masked_magnitudes_as(DT_F32, MAGNITUDES_ARGS(0));
    return 1;
}

/* One non-base entry of a task-arithmetic merge.
 *   kind 0: the zero vector;
 *   kind 1: a masked vector made by phase one (dtype), times scale when has_scale;
 *   kind 2: source - base (dtype), kept where key_lo <= keys[j] < key_hi (keys: a magnitude
 *           rank or the bits of a uniform draw, or their high halves, all >= 0: key_at; NULL
 *           keeps every element). A dropped
 *           element is +0, as fastpath.py's bit-and with a 0/-1 mask makes it;
 *   kind 3: a stored task vector (source - base, already in dtype), kept by keys as in kind 2,
 *           times scale when has_scale;
 *   kind 4: sign of a stored task vector (data) | magnitudes (masked_magnitudes' output) times
 *           scale when has_scale: phase two of a rescaled entry, the masked vector's values
 *           made from what phase one wrote anyway (a dropped element is +-0: a zero's sign
 *           never reaches the result, as in fastpath.py's masks).
 * weight and scale are dtype values held in float32. */
typedef struct {
    int32_t kind;
    int32_t has_scale;
    float scale;
    float weight;
    const void *data;
    const void *keys;
    int32_t key_lo;
    int32_t key_hi;
    const void *magnitudes;
    int32_t key16; /* keys are uint16 (see key_at) */
} entry_t;

/* The value whose sign is sign_of[j]'s and whose other bits are magnitude[j]'s. */
SPECIALIZE float signed_magnitude(const int dtype, const void *sign_of, const void *magnitude, int64_t j) {
    if (dtype == DT_BF16) {
        uint16_t bits = (((const uint16_t *)sign_of)[j] & 0x8000u) | ((const uint16_t *)magnitude)[j];
        return bf16_to_f32(bits);
    }
    return bits_to_f32((((const uint32_t *)sign_of)[j] & 0x80000000u) | ((const uint32_t *)magnitude)[j]);
}

/* d[k] = entry * weight over one block: deltas.mul_(weights) after sparsification. */
SPECIALIZE void weighted_delta(const int dtype, const entry_t *e, const void *base, int64_t start, int64_t size,
                               float *restrict d) {
    const float w = e->weight;
    if (e->kind == 0) {
        for (int64_t k = 0; k < size; k++) d[k] = round_to(0.0f * w, dtype);
    } else if (e->kind == 1 && e->has_scale) {
        for (int64_t k = 0; k < size; k++)
            d[k] = round_to(round_to(load(e->data, dtype, start + k) * e->scale, dtype) * w, dtype);
    } else if (e->kind == 1) {
        for (int64_t k = 0; k < size; k++) d[k] = round_to(load(e->data, dtype, start + k) * w, dtype);
    } else if (e->kind == 4) {
        const float scale = e->has_scale ? e->scale : 1.0f;
        for (int64_t k = 0; k < size; k++) {
            float v = signed_magnitude(dtype, e->data, e->magnitudes, start + k);
            d[k] = round_to(round_to(v * scale, dtype) * w, dtype);
        }
    } else if (e->kind == 3) {
        const int32_t lo = e->key_lo, hi = e->key_hi;
        const float scale = e->has_scale ? e->scale : 1.0f; /* x * 1 == x: no branch in the loop */
        if (e->keys && e->key16)
            for (int64_t k = 0; k < size; k++) {
                float v = keep_or_zero(load(e->data, dtype, start + k), key_at(e->keys, 1, start + k), lo, hi);
                d[k] = round_to(round_to(v * scale, dtype) * w, dtype);
            }
        else if (e->keys)
            for (int64_t k = 0; k < size; k++) {
                float v = keep_or_zero(load(e->data, dtype, start + k), key_at(e->keys, 0, start + k), lo, hi);
                d[k] = round_to(round_to(v * scale, dtype) * w, dtype);
            }
        else
            for (int64_t k = 0; k < size; k++)
                d[k] = round_to(round_to(load(e->data, dtype, start + k) * scale, dtype) * w, dtype);
    } else if (e->keys) {
        const int32_t lo = e->key_lo, hi = e->key_hi;
        if (e->key16)
            for (int64_t k = 0; k < size; k++) {
                float v = round_to(load(e->data, dtype, start + k) - load(base, dtype, start + k), dtype);
                d[k] = round_to(keep_or_zero(v, key_at(e->keys, 1, start + k), lo, hi) * w, dtype);
            }
        else
            for (int64_t k = 0; k < size; k++) {
                float v = round_to(load(e->data, dtype, start + k) - load(base, dtype, start + k), dtype);
                d[k] = round_to(keep_or_zero(v, key_at(e->keys, 0, start + k), lo, hi) * w, dtype);
            }
    } else {
        for (int64_t k = 0; k < size; k++)
            d[k] = round_to(round_to(load(e->data, dtype, start + k) - load(base, dtype, start + k), dtype) * w, dtype);
    }
}

/* Phase two, GeneralizedTaskArithmeticMerge after sparsification, per element:
 *   d_i = (entry_i) * weight_i                                   deltas.mul_(weights)
 *   consensus: s = sum_i d_i; d_i kept iff sign(d_i) == sign(s)  TIES sign election
 *   mixed = sum_i d_i                                            sum(dim=0): +0, add in order, round once
 *   normalize: mixed / divisor, divisor = sum of the weights of nonzero kept d_i with
 *              consensus (0 -> 1), else the given divisor
 *   mixed = mixed * lambda_ (when apply_lambda)
 *   out = base + mixed
 * Sums run entry by entry in order, as torch's sum over dim 0 adds up to 4 rows. The entries'
 * weighted deltas are made block by block (one loop per entry kind); the rest is one loop per
 * element, instantiated per entry count so that it compiles to registers only. */
SPECIALIZE void mix_block(const int dtype, const int n, float d[MAX_ENTRIES][BLOCK], const uint32_t *weight_bits,
                          const void *base, float *merged, int64_t start, int64_t size, const int consensus,
                          const int normalize, float divisor, const int apply_lambda, float lambda_) {
    /* (each flag is a constant in each instance: no branch inside the loop) */
    for (int64_t k = 0; k < size; k++) {
        float v[MAX_ENTRIES];
        for (int i = 0; i < n; i++) v[i] = d[i][k];
        if (consensus) {
            float s = 0.0f;
            for (int i = 0; i < n; i++) s = s + v[i];
            /* rounding keeps the sign (of a NaN too: its low 16 bits are clear, see round_bf16) */
            uint32_t sign = f32_to_bits(s) & 0x80000000u;
            for (int i = 0; i < n; i++) { /* +0 where the sign bit differs from the sum's */
                uint32_t bits = f32_to_bits(v[i]);
                v[i] = bits_to_f32(bits & (((bits ^ sign) >> 31) - 1u));
            }
        }
        float mixed = 0.0f;
        for (int i = 0; i < n; i++) mixed = mixed + v[i];
        mixed = round_to(mixed, dtype);
        if (normalize && consensus) {
            float q = 0.0f; /* mergekit's (weights * mask).sum(dim=0); divisor[divisor == 0] = 1 */
            for (int i = 0; i < n; i++) {
                uint32_t nonzero = (uint32_t)0 - (uint32_t)((f32_to_bits(v[i]) & 0x7fffffffu) != 0);
                q = q + bits_to_f32(weight_bits[i] & nonzero);
            }
            uint32_t total = f32_to_bits(round_to(q, dtype));
            uint32_t zero = (uint32_t)0 - (uint32_t)((total & 0x7fffffffu) == 0);
            mixed = round_to(mixed / bits_to_f32((total & ~zero) | (0x3f800000u & zero)), dtype);
        } else if (normalize) {
            mixed = round_to(mixed / divisor, dtype);
        }
        if (apply_lambda) mixed = round_to(mixed * lambda_, dtype);
        merged[k] = round_to(load(base, dtype, start + k) + mixed, dtype);
    }
}

#define MIX_BLOCK(CONSENSUS, NORMALIZE)                                                                     \
    (apply_lambda ? mix_block(dtype, n, d, weight_bits, base, merged, start, size, CONSENSUS, NORMALIZE, divisor, 1, \
                              lambda_)                                                                        \
                  : mix_block(dtype, n, d, weight_bits, base, merged, start, size, CONSENSUS, NORMALIZE, divisor, 0, \
                              lambda_))

SPECIALIZE int task_arithmetic_as(const int dtype, const int n, const entry_t *entries, const void *base, void *out,
                                  int consensus, int normalize, float divisor, int apply_lambda, float lambda_,
                                  int64_t begin, int64_t end) {
    int bad = 0;
    const int stream = end - begin >= STREAM_MIN_ELEMENTS;
    uint32_t weight_bits[MAX_ENTRIES];
    for (int i = 0; i < n; i++) weight_bits[i] = f32_to_bits(entries[i].weight);
    for (int64_t start = begin; start < end; start += BLOCK) {
        const int64_t size = start + BLOCK < end ? BLOCK : end - start;
        float d[MAX_ENTRIES][BLOCK], merged[BLOCK];
        for (int i = 0; i < n; i++) weighted_delta(dtype, &entries[i], base, start, size, d[i]);
        /* the flags are loop invariant: each combination gets its own straight loop */
        if (consensus && normalize)
            MIX_BLOCK(1, 1);
        else if (consensus)
            MIX_BLOCK(1, 0);
        else if (normalize)
            MIX_BLOCK(0, 1);
        else
            MIX_BLOCK(0, 0);
        bad |= store_block(out, dtype, start, merged, size, stream, 1);
    }
    fence_streaming_stores();
    return !bad;
}

#define TASK_ARITHMETIC_ARGS entries, base, out, consensus, normalize, divisor, apply_lambda, lambda_, begin, end
#define FOR_DTYPE(N) (dtype == DT_BF16 ? task_arithmetic_as(DT_BF16, N, TASK_ARITHMETIC_ARGS) \
                                       : task_arithmetic_as(DT_F32, N, TASK_ARITHMETIC_ARGS))

EXPORTED int task_arithmetic(int dtype, int n, const entry_t *entries, const void *base, void *out, int consensus,
                             int normalize, float divisor, int apply_lambda, float lambda_, int64_t begin,
                             int64_t end) {
    switch (n) {
    case 1: return FOR_DTYPE(1);
    case 2: return FOR_DTYPE(2);
    case 3: return FOR_DTYPE(3);
    case 4: return FOR_DTYPE(4);
    default: return -1;
    }
}

/* A candidate's task-arithmetic tensors in two calls per thread (fused.py's TaskArithmeticBatch):
 * phase one of every stored rescaled entry (masked_magnitudes), then, once torch has summed those
 * magnitudes and the scales are known, phase two of every tensor (task_arithmetic). Each job is one
 * piece [begin, end) of one tensor with the single call's arguments; the arithmetic per element
 * is exactly the single call's. What is saved: a call, a thread hand-off and the Python around
 * them per tensor and entry, and short ranges that the hardware prefetchers barely start on. */
typedef struct {
    int32_t dtype;
    int32_t key_lo;
    int32_t key_hi;
    int32_t key16;
    const void *task_vector;
    const void *keys;
    void *magnitudes;
    int64_t begin;
    int64_t end;
} MagnitudesJob;

int masked_magnitudes_batch(const MagnitudesJob *jobs, int count, int32_t *counter) {
    for (int i; (i = next_job(counter)) < count;) {
        const MagnitudesJob *job = &jobs[i];
        masked_magnitudes(job->dtype, job->task_vector, job->keys, job->key16, job->key_lo, job->key_hi,
                          job->magnitudes, job->begin, job->end);
    }
    return 1;
}

/* The sum of what masked_magnitudes would write, without writing it: kept |tv| of a bfloat16
 * task vector. Each block of L1_BLOCK elements is masked into a buffer that stays in L1 (on
 * 16-bit lanes: uint16 keys compare as they are), summed in float32 in any order (an `omp simd`
 * reduction, the only reassociation -fopenmp-simd allows: relative error under L1_BLOCK * 2^-24),
 * and the blocks' sums in float64 (under (end - begin) * 2^-53 more); l1_sum.py allows for both
 * when it works out torch's bfloat16 l1 sum from these. */
#define L1_BLOCK 256
SPECIALIZE double masked_l1_as(const void *tv, const void *keys, const int key16, int32_t key_lo, int32_t key_hi,
                               int64_t begin, int64_t end) {
    const uint16_t *t = (const uint16_t *)tv;
    /* uint16 keys are < 0x8000: clamping the range there keeps exactly the same keys */
    const uint16_t lo16 = (uint16_t)(key_lo < 0 ? 0 : key_lo < 0x8000 ? key_lo : 0x8000);
    const uint16_t hi16 = (uint16_t)(key_hi < 0 ? 0 : key_hi < 0x8000 ? key_hi : 0x8000);
    double total = 0.0;
    for (int64_t start = begin; start < end; start += L1_BLOCK) {
        const int64_t size = start + L1_BLOCK < end ? L1_BLOCK : end - start;
        uint16_t kept[L1_BLOCK];
        if (key16) {
            const uint16_t *k16 = (const uint16_t *)keys + start;
            for (int64_t k = 0; k < size; k++)
                kept[k] = t[start + k] & 0x7fffu & -(uint16_t)((k16[k] >= lo16) & (k16[k] < hi16));
        } else {
            const int32_t *k32 = (const int32_t *)keys + start;
            for (int64_t k = 0; k < size; k++)
                kept[k] = t[start + k] & 0x7fffu & -(uint16_t)((k32[k] >= key_lo) & (k32[k] < key_hi));
        }
        float block = 0.0f;
#pragma omp simd reduction(+ : block)
        for (int64_t k = 0; k < size; k++) block += bits_to_f32((uint32_t)kept[k] << 16);
        total += (double)block;
    }
    return total;
}

EXPORTED double masked_l1(const void *tv, const void *keys, int key16, int32_t key_lo, int32_t key_hi, int64_t begin,
                          int64_t end) {
    return key16 ? masked_l1_as(tv, keys, 1, key_lo, key_hi, begin, end)
                 : masked_l1_as(tv, keys, 0, key_lo, key_hi, begin, end);
}

/* masked_l1 over pieces taken in turn; each piece's sum written into its job. */
typedef struct {
    int32_t key_lo;
    int32_t key_hi;
    int32_t key16;
    const void *task_vector;
    const void *keys;
    int64_t begin;
    int64_t end;
    double sum; /* written here */
} L1Job;

int masked_l1_batch(L1Job *jobs, int count, int32_t *counter) {
    for (int i; (i = next_job(counter)) < count;) {
        L1Job *job = &jobs[i];
        job->sum = masked_l1(job->task_vector, job->keys, job->key16, job->key_lo, job->key_hi, job->begin, job->end);
    }
    return 1;
}

/* DARE's l1 sums for every density at once: per range of a bfloat16 task vector, the sum of |tv|
 * over the elements whose uint16 key (the high half of a uniform draw in [0, 1): < 0x3f80) is k,
 * for each k, in float64 (l1_sum.py allows for its rounding). A prefix sum of these is the
 * masked_l1 of every key range [0, hi); fused.py's key16_l1_prefix. */
#define KEY16_BINS 0x3f80
typedef struct {
    const void *task_vector;
    const void *keys;
    int64_t begin;
    int64_t end;
    double *histogram; /* KEY16_BINS zeros, written here */
} HistogramJob;

int key16_l1_histogram_batch(HistogramJob *jobs, int count, int32_t *counter) {
    for (int i; (i = next_job(counter)) < count;) {
        const HistogramJob *job = &jobs[i];
        const uint16_t *t = (const uint16_t *)job->task_vector, *keys = (const uint16_t *)job->keys;
        double *histogram = job->histogram;
        for (int64_t j = job->begin; j < job->end; j++) {
            if (keys[j] >= KEY16_BINS) return -3;
            histogram[keys[j]] += (double)bf16_to_f32(t[j] & 0x7fffu);
        }
    }
    return 1;
}

typedef struct {
    int32_t dtype;
    int32_t n;
    int32_t consensus;
    int32_t normalize;
    float divisor;
    int32_t apply_lambda;
    float lambda_;
    int32_t finite; /* written here */
    const entry_t *entries;
    const void *base;
    void *out;
    int64_t begin;
    int64_t end;
} TaskArithmeticJob;

int task_arithmetic_batch(TaskArithmeticJob *jobs, int count, int32_t *counter) {
    for (int i; (i = next_job(counter)) < count;) {
        TaskArithmeticJob *job = &jobs[i];
        const int finite = task_arithmetic(job->dtype, job->n, job->entries, job->base, job->out, job->consensus,
                                           job->normalize, job->divisor, job->apply_lambda, job->lambda_,
                                           job->begin, job->end);
        if (finite < 0) return finite;
        job->finite = finite;
    }
    return 1;
}

/* ------------------------------------------------------------------------------------------ SCE
 * mergekit.merge_methods.sce.sce_merge after its top-k mask, per element (d[i] = tv_i: the
 * entries are made with weight 1, which changes no value):
 *   s = sum_i tv_i; kept_i: tv_i nonzero with the sign of s     sign_consensus_mask(tvs, "sum")
 *   merged = sum_i tv_i * w_i over the kept                      (tvs * erased_weights).sum(dim=0)
 *   divisor = sum_i w_i over the kept, at least min_divisor      .clamp(min=1e-6), 1e-6 in dtype
 *   out = base + merged / divisor
 * w_i: the per-model SCE weights, dtype values. As in mix_block, a dropped element is +0 (mergekit
 * multiplies it by 0: +-0, or NaN for an infinite one; the candidate is non-finite either way). */
SPECIALIZE void sce_block(const int dtype, const int n, float d[MAX_ENTRIES][BLOCK], const float *weights,
                          const void *base, float *merged, int64_t start, int64_t size, float min_divisor) {
    uint32_t weight_bits[MAX_ENTRIES];
    for (int i = 0; i < n; i++) weight_bits[i] = f32_to_bits(weights[i]);
    for (int64_t k = 0; k < size; k++) {
        float s = 0.0f;
        for (int i = 0; i < n; i++) s = s + d[i][k];
        const uint32_t sign = f32_to_bits(s) & 0x80000000u; /* rounding keeps the sign */
        float m = 0.0f, q = 0.0f;
        for (int i = 0; i < n; i++) {
            const uint32_t bits = f32_to_bits(d[i][k]);
            const uint32_t nonzero = (uint32_t)0 - (uint32_t)((bits & 0x7fffffffu) != 0);
            const uint32_t keep = (((bits ^ sign) >> 31) - 1u) & nonzero;
            m = m + bits_to_f32(f32_to_bits(round_to(d[i][k] * weights[i], dtype)) & keep);
            q = q + bits_to_f32(weight_bits[i] & keep);
        }
        m = round_to(m, dtype);
        q = round_to(q, dtype);
        q = q < min_divisor ? min_divisor : q; /* a NaN stays NaN, as in torch's clamp */
        merged[k] = round_to(load(base, dtype, start + k) + round_to(m / q, dtype), dtype);
    }
}

SPECIALIZE int sce_as(const int dtype, const int n, const entry_t *entries, const float *weights, const void *base,
                      void *out, float min_divisor, int64_t begin, int64_t end) {
    int bad = 0;
    const int stream = end - begin >= STREAM_MIN_ELEMENTS;
    for (int64_t start = begin; start < end; start += BLOCK) {
        const int64_t size = start + BLOCK < end ? BLOCK : end - start;
        float d[MAX_ENTRIES][BLOCK], merged[BLOCK];
        for (int i = 0; i < n; i++) weighted_delta(dtype, &entries[i], base, start, size, d[i]);
        sce_block(dtype, n, d, weights, base, merged, start, size, min_divisor);
        bad |= store_block(out, dtype, start, merged, size, stream, 1);
    }
    fence_streaming_stores();
    return !bad;
}

#define SCE_FOR_DTYPE(N) (dtype == DT_BF16 ? sce_as(DT_BF16, N, entries, weights, base, out, min_divisor, begin, end) \
                                           : sce_as(DT_F32, N, entries, weights, base, out, min_divisor, begin, end))

EXPORTED int sce(int dtype, int n, const entry_t *entries, const float *weights, const void *base, void *out,
                 float min_divisor, int64_t begin, int64_t end) {
    for (int i = 0; i < n; i++)
        if (entries[i].weight != 1.0f) return -2; /* the entries are the task vectors themselves */
    switch (n) {
    case 1: return SCE_FOR_DTYPE(1);
    case 2: return SCE_FOR_DTYPE(2);
    case 3: return SCE_FOR_DTYPE(3);
    case 4: return SCE_FOR_DTYPE(4);
    default: return -1;
    }
}
