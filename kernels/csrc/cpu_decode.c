/* The small operations of one PaLM decode step on the CPU, in one call per layer.
 *
 * Between the two weight-streaming matmuls of a layer (the fused input projection and the
 * merged output projection) a decode step does a dozen small tensor operations: split the
 * fused projection, rotate queries and key, write the key and value into the cache, attend
 * over the cache, SwiGLU, and gather the attention output and the SwiGLU output into one row
 * for the output projection. In eager PyTorch each costs a few microseconds of dispatch, more
 * than its arithmetic; here they are one loop nest per row.
 *
 * Per row r of `fused` (row length `fused_rs` elements), laid out as
 *     [q: heads x dim_head | k: dim_head | v: dim_head | ff value: ff | ff gate: ff]
 * it writes
 *     k_cache[r, pos] = rotate(k),  v_cache[r, pos] = v
 *     out[r] = [softmax(scale * rotate(q_j) . K[r, start..pos]) V[r, start..pos] for each head j
 *               | value * silu(gate)]
 * where rotate(x)[i] = x[i] * cos[i] + x[(i + d/2) % d] * sin[i] (sin sign-folded, as in
 * palm_rlhf.model.Rotary), cos/sin are one row shared by all rows or one per row, and the
 * first attended slot `start` is shared or given per row (left-padded batches).
 *
 * Two element types: float32 and bfloat16 (rounded to nearest even on store). Arithmetic is
 * float32 throughout; bfloat16 is rounded only where a tensor is written.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEAD_DIM 256
/* everything is inlined into the entry point, so that each copy of a portable build (below)
 * compiles all of it for its own instruction set */
#define INLINE static inline __attribute__((always_inline))

INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

INLINE uint16_t f32_to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* n elements of type `bf16 ? bfloat16 : float32` at src as float32: src itself for float32,
 * else converted into dst */
INLINE const float *load_row(const void *src, float *dst, long n, int bf16) {
    if (!bf16) return src;
    const uint16_t *s = src;
    for (long i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    return dst;
}

INLINE void store_row(void *dst, const float *src, long n, int bf16) {
    if (bf16) {
        uint16_t *d = dst;
        for (long i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, sizeof(float) * (size_t)n);
    }
}

/* exp(x) in float32, branch-free so that loops over it vectorize (libm's expf is one call
 * per element): x = k ln2 + r with |r| <= ln2 / 2 (k rounded with the 1.5 * 2^23 trick),
 * e^r by a degree-6 polynomial (Taylor coefficients: relative error below 2e-7 there),
 * times 2^k made from exponent bits. Inputs are clamped to [-87, 88]: 2^k stays normal. */
INLINE float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504088896341f + shifter;
    int32_t k;
    memcpy(&k, &t, sizeof k);
    k -= 0x4b400000; /* the bits of the shifter: leaves the rounded integer */
    float kf = (float)k;
    float r = x - kf * 0.693145751953125f; /* ln2 in two parts: the first product is exact */
    r = r - kf * 1.428606765330187045e-06f;
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t bits = (k + 127) << 23;
    float two_k;
    memcpy(&two_k, &bits, sizeof two_k);
    return p * two_k;
}

/* rotate(x) into y (float32), d even */
INLINE void rotate(const float *x, const float *cs, const float *sn, float *y, long d, float scale) {
    const long half = d / 2;
    for (long i = 0; i < half; i++) {
        y[i] = (x[i] * cs[i] + x[i + half] * sn[i]) * scale;
        y[i + half] = (x[i + half] * cs[i + half] + x[i] * sn[i + half]) * scale;
    }
}

INLINE float max_of(const float *s, long n) {
    /* sixteen running maxima, elementwise (vectorizes; a single running max does not) */
    float m[16];
    for (int l = 0; l < 16; l++) m[l] = s[0];
    long t = 0;
    for (; t + 16 <= n; t += 16)
        for (int l = 0; l < 16; l++) m[l] = s[t + l] > m[l] ? s[t + l] : m[l];
    for (; t < n; t++) m[0] = s[t] > m[0] ? s[t] : m[0];
    float best = m[0];
    for (int l = 1; l < 16; l++) best = m[l] > best ? m[l] : best;
    return best;
}

INLINE void softmax_inplace(float *s, long n) {
    const float m = max_of(s, n);
    float sum = 0.f;
    for (long t = 0; t < n; t++) {
        s[t] = fast_exp(s[t] - m);
        sum += s[t];
    }
    const float inv = 1.f / sum;
    for (long t = 0; t < n; t++) s[t] *= inv;
}

/* Attention of `heads` query rows q (heads x D, scaled) over n keys and values (rows of
 * `stride` floats): o (heads x D). `D` is a constant at the call sites below, so that the
 * inner loops unroll and each head's accumulator stays in registers. */
INLINE void attend(const float *q, const float *K, const float *V, long stride, long n, long heads, float *scores,
                   float *o, const long D) {
    for (long j = 0; j < heads; j++) {
        const float *qj = q + j * D;
        float *sj = scores + j * n;
        for (long t = 0; t < n; t++) {
            const float *kt = K + t * stride;
            float acc = 0.f;
            for (long i = 0; i < D; i++) acc += qj[i] * kt[i];
            sj[t] = acc;
        }
        softmax_inplace(sj, n);
        float acc[MAX_HEAD_DIM];
        for (long i = 0; i < D; i++) acc[i] = 0.f;
        for (long t = 0; t < n; t++) {
            const float p = sj[t], *vt = V + t * stride;
            for (long i = 0; i < D; i++) acc[i] += p * vt[i];
        }
        for (long i = 0; i < D; i++) o[j * D + i] = acc[i];
    }
}

/* The same for a head dimension that is a multiple of 16, in GCC/Clang vector types: the
 * query and the accumulator of a head are NV vectors of 16 floats held in registers, and every
 * key and value row is read as NV vector loads (whatever the target's vector width; without
 * wide vectors the compiler splits them). */
#if (defined(__AVX2__) || defined(__AVX512F__)) && !defined(PALM_PORTABLE)
#define HAVE_WIDE_VECTORS 1
#else
#define HAVE_WIDE_VECTORS 0 /* 16-float vectors would be split into slow pieces: use the plain loops */
#endif

typedef float v16 __attribute__((vector_size(64)));

INLINE v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE float hsum16(v16 v) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    v8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 g = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (g[0] + g[2]) + (g[1] + g[3]);
#else
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
#endif
}

INLINE void attend_v(const float *q, const float *K, const float *V, long stride, long n, long heads, float *scores,
                     float *o, const int NV) {
    for (long j = 0; j < heads; j++) {
        v16 qv[8], acc[8];
        for (int c = 0; c < NV; c++) qv[c] = load16(q + j * NV * 16 + c * 16);
        float *sj = scores + j * n;
        for (long t = 0; t < n; t++) {
            const float *kt = K + t * stride;
            v16 sum = qv[0] * load16(kt);
            for (int c = 1; c < NV; c++) sum += qv[c] * load16(kt + c * 16);
            sj[t] = hsum16(sum);
        }
        softmax_inplace(sj, n);
        for (int c = 0; c < NV; c++) acc[c] = (v16){0};
        for (long t = 0; t < n; t++) {
            const float p = sj[t], *vt = V + t * stride;
            for (int c = 0; c < NV; c++) acc[c] += p * load16(vt + c * 16);
        }
        for (int c = 0; c < NV; c++) memcpy(o + j * NV * 16 + c * 16, &acc[c], sizeof(v16));
    }
}

INLINE void attend_any(const float *q, const float *K, const float *V, long stride, long n, long heads, float *scores,
                       float *o, long d) {
    switch (d) {
#if HAVE_WIDE_VECTORS
    case 64: attend_v(q, K, V, stride, n, heads, scores, o, 4); break;
    case 128: attend_v(q, K, V, stride, n, heads, scores, o, 8); break;
    case 32: attend_v(q, K, V, stride, n, heads, scores, o, 2); break;
#else
    case 64: attend(q, K, V, stride, n, heads, scores, o, 64); break;
    case 128: attend(q, K, V, stride, n, heads, scores, o, 128); break;
    case 32: attend(q, K, V, stride, n, heads, scores, o, 32); break;
#endif
    default: attend(q, K, V, stride, n, heads, scores, o, d); break;
    }
}

INLINE void swiglu(const float *value, const float *gate, float *out, long n) {
    for (long i = 0; i < n; i++) out[i] = value[i] * (gate[i] / (1.f + fast_exp(-gate[i])));
}

INLINE int decode(const void *fused, long fused_rs, const void *cos_t, const void *sin_t, long cs_rs, void *k_cache,
                  void *v_cache, long kv_rs, long kv_ts, long start, const int64_t *starts, long pos, long rows,
                  long heads, long d, long ff, float scale, void *out, long out_rs, int bf16) {
    if (d <= 0 || d > MAX_HEAD_DIM || d % 2 || pos < 0) return -1;
    for (long r = 0; r < rows; r++) {
        const long s0 = starts ? (long)starts[r] : start;
        if (s0 < 0 || s0 > pos) return -1;
    }
    const size_t es = bf16 ? 2 : 4;
    const long n_max = pos + 1, width = heads * d + 2 * d + 2 * ff, out_width = heads * d + ff;
    float cs_buf[MAX_HEAD_DIM], sn_buf[MAX_HEAD_DIM], kv[MAX_HEAD_DIM];
    /* scratch: the row in float32, rotated queries, scores, the output row and, for
     * bfloat16, the attended keys and values in float32 */
    const long kv_scratch = bf16 ? 2 * n_max * d : 0;
    float *xbuf = malloc(sizeof(float) * (size_t)(width + heads * d + heads * n_max + out_width + kv_scratch));
    if (!xbuf) return -2;
    float *q = xbuf + width, *scores = q + heads * d, *o = scores + heads * n_max, *kf = o + out_width,
          *vf = kf + n_max * d;
    for (long r = 0; r < rows; r++) {
        /* this row's first valid slot and rotary row (cs_rs = 0: one row shared by all) */
        const long row_start = starts ? (long)starts[r] : start, n = pos - row_start + 1;
        const float *cs = load_row((const char *)cos_t + (size_t)(r * cs_rs) * es, cs_buf, d, bf16);
        const float *sn = load_row((const char *)sin_t + (size_t)(r * cs_rs) * es, sn_buf, d, bf16);
        char *kr = (char *)k_cache + (size_t)(r * kv_rs) * es, *vr = (char *)v_cache + (size_t)(r * kv_rs) * es;
        const float *x = load_row((const char *)fused + (size_t)(r * fused_rs) * es, xbuf, width, bf16);
        for (long j = 0; j < heads; j++) rotate(x + j * d, cs, sn, q + j * d, d, scale);
        /* the new key (rotated) and value go into the cache at slot pos */
        rotate(x + heads * d, cs, sn, kv, d, 1.f);
        store_row(kr + (size_t)(pos * kv_ts) * es, kv, d, bf16);
        memcpy(vr + (size_t)(pos * kv_ts) * es, (const char *)fused + (size_t)(r * fused_rs + heads * d + d) * es,
               (size_t)d * es);
        if (bf16) {
            for (long t = 0; t < n; t++) {
                load_row(kr + (size_t)((row_start + t) * kv_ts) * es, kf + t * d, d, 1);
                load_row(vr + (size_t)((row_start + t) * kv_ts) * es, vf + t * d, d, 1);
            }
            attend_any(q, kf, vf, d, n, heads, scores, o, d);
        } else {
            const float *K = (const float *)kr + row_start * kv_ts, *V = (const float *)vr + row_start * kv_ts;
            attend_any(q, K, V, kv_ts, n, heads, scores, o, d);
        }
        const float *value = x + heads * d + 2 * d;
        swiglu(value, value + ff, o + heads * d, ff);
        store_row((char *)out + (size_t)(r * out_rs) * es, o, out_width, bf16);
    }
    free(xbuf);
    return 0;
}

/* The entry point. `a` holds, as 64-bit integers: 0 float32 / 1 bfloat16, fused, fused row
 * stride, cos, sin, cos/sin row stride (0: one row for all), k_cache, v_cache, cache row
 * stride, cache slot stride, start, starts (per-row first slots, int64, or 0 for `start`),
 * pos, rows, heads, dim_head, ff, out, out row stride (pointers as addresses, strides in
 * elements). One array instead of nineteen arguments: the call from Python is several
 * times cheaper. Returns 0 on success, -1 for a bad dim_head or slot range, -2 when out of
 * memory. */
#if defined(PALM_PORTABLE) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
/* a portable build: one copy per x86-64 level, the best one picked when the library loads */
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
int palm_attn_swiglu(const int64_t *a, float scale) {
    return decode((const void *)(intptr_t)a[1], (long)a[2], (const void *)(intptr_t)a[3],
                  (const void *)(intptr_t)a[4], (long)a[5], (void *)(intptr_t)a[6], (void *)(intptr_t)a[7],
                  (long)a[8], (long)a[9], (long)a[10], (const int64_t *)(intptr_t)a[11], (long)a[12], (long)a[13],
                  (long)a[14], (long)a[15], (long)a[16], scale, (void *)(intptr_t)a[17], (long)a[18], a[0] != 0);
}

/* A version number the loader checks, so that a stale cached build is never used. */
int palm_cpu_decode_abi(void) { return 3; }
