/* The sampler's full-vocabulary passes in C (fastllm/native.py loads this with ctypes; no Python API).
 *
 * Every function reads and writes caller-owned float32 / float64 / int64 buffers and allocates nothing:
 *   fl_exp_rows   e = exp(x * scale - offset) over rows of logits, with the running float64 sums of its blocks
 *   fl_search     inverse CDF inside one block: the first index whose running sum passes a target
 *   fl_max_rows   the max and argmax of rows (numpy's, NaN first)
 *   fl_draw_rows  inverse-CDF draws over rows from those sums, each with its top-p check
 *   fl_reaching   the mass of the weights >= w; fl_inside the top-p check of one drawn token, ties by id
 *   fl_top        the k largest values of a row, largest first, ties by the smaller id; fl_top_rows over rows
 *   fl_at_least_rows  the ids of the entries at or above a threshold, over rows (min-p's candidates)
 * The vectorised bodies are compiled for AVX2 + FMA, and the exp, max and top-p mass for AVX-512 too (target
 * attributes, not build flags), chosen at run time by the CPU's flags; other CPUs take the scalar bodies, the same
 * arithmetic up to rounding (each exp is the same float in the AVX2 and AVX-512 bodies, their sums differ in order
 * only). exp is Cody-Waite range reduction to |r| <= ln2 / 2 and the degree-7 Taylor polynomial there (relative
 * error < 1e-8 before rounding): below -87.3 it is 0 (no denormals), NaN stays NaN.
 * A large call is split over a few helper threads of its own (made on first use; after a part they poll for
 * ~50 us, then sleep, so they hold no core the model's session needs for longer than that).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FL_X86 1
#include <immintrin.h>
#endif

#define FL_LOG2E 1.44269504088896341f
#define FL_LN2_HI 0.693145751953125f     /* ln 2 split so n * LN2_HI is exact for |n| < 2^11 */
#define FL_LN2_LO 1.42860682030941723e-6f
#define FL_EXP_LO -87.3f                 /* exp below this is taken as 0 (the smallest normal float is e^-87.34) */
#define FL_EXP_HI 88.3f                  /* and above this as exp(88.3) (~2.2e38): the sums stay finite */

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* -- scalar bodies ------------------------------------------------------------------------------------------- */
static float exp_scalar(float x) {
    if (x < FL_EXP_LO) return 0.0f;
    if (x > FL_EXP_HI) x = FL_EXP_HI;
    if (x != x) return x;
    float n = nearbyintf(x * FL_LOG2E);
    float r = fmaf(-n, FL_LN2_HI, x);
    r = fmaf(-n, FL_LN2_LO, r);
    float p = 1.0f / 5040;
    p = fmaf(p, r, 1.0f / 720);
    p = fmaf(p, r, 1.0f / 120);
    p = fmaf(p, r, 1.0f / 24);
    p = fmaf(p, r, 1.0f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* e[0:n] = exp(x * scale - offset); returns their sum (float32, as the block sums have always been) */
static float exp_block_scalar(const float *x, float *e, int64_t n, float scale, float offset) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        e[i] = exp_scalar(x[i] * scale - offset);
        sum += e[i];
    }
    return sum;
}

static double reaching_scalar(const float *e, int64_t n, float w, int64_t *equal) {
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        if (e[i] >= w) sum += e[i];
        count += e[i] == w;
    }
    *equal = count;
    return sum;
}

/* -- AVX2 + FMA bodies --------------------------------------------------------------------------------------- */
#ifdef FL_X86
#define FL_AVX2 __attribute__((target("avx2,fma")))

FL_AVX2 static __m256 exp8(__m256 x) {
    const __m256 zero_below = _mm256_cmp_ps(x, _mm256_set1_ps(FL_EXP_LO), _CMP_LT_OQ);  /* -inf included */
    x = _mm256_min_ps(_mm256_set1_ps(FL_EXP_HI), x);   /* the second operand is returned for NaN: NaN stays */
    /* n = round(x / ln2) by the float adder: 1.5 * 2^23 + y holds round(y) in its low mantissa bits */
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    __m256 shifted = _mm256_fmadd_ps(x, _mm256_set1_ps(FL_LOG2E), magic);
    __m256 n = _mm256_sub_ps(shifted, magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(FL_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(FL_LN2_LO), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* 2^n: n's low bits moved into the exponent field (the magic's own bits shift out), plus the bias */
    __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(shifted), 23), _mm256_set1_epi32(127 << 23));
    return _mm256_andnot_ps(zero_below, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

FL_AVX2 static float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

FL_AVX2 static float exp_block_avx2(const float *x, float *e, int64_t n, float scale, float offset) {
    const __m256 vs = _mm256_set1_ps(scale), vo = _mm256_set1_ps(offset);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {  /* four independent exps in flight */
        __m256 a = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + i), vs, vo));
        __m256 b = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + i + 8), vs, vo));
        __m256 c = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + i + 16), vs, vo));
        __m256 d = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + i + 24), vs, vo));
        _mm256_storeu_ps(e + i, a);
        _mm256_storeu_ps(e + i + 8, b);
        _mm256_storeu_ps(e + i + 16, c);
        _mm256_storeu_ps(e + i + 24, d);
        acc0 = _mm256_add_ps(acc0, a);
        acc1 = _mm256_add_ps(acc1, b);
        acc2 = _mm256_add_ps(acc2, c);
        acc3 = _mm256_add_ps(acc3, d);
    }
    acc0 = _mm256_add_ps(acc0, acc2);
    acc1 = _mm256_add_ps(acc1, acc3);
    for (; i + 8 <= n; i += 8) {
        __m256 a = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + i), vs, vo));
        _mm256_storeu_ps(e + i, a);
        acc0 = _mm256_add_ps(acc0, a);
    }
    float sum = hsum8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) {
        e[i] = exp_scalar(x[i] * scale - offset);
        sum += e[i];
    }
    return sum;
}

/* the sum (float64) of e[0:n) at entries >= w, and in *equal how many are == w */
FL_AVX2 static double reaching_avx2(const float *e, int64_t n, float w, int64_t *equal) {
    const __m256 vw = _mm256_set1_ps(w);
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    __m256i same = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(e + i);
        same = _mm256_sub_epi32(same, _mm256_castps_si256(_mm256_cmp_ps(v, vw, _CMP_EQ_OQ)));  /* -1 where equal */
        v = _mm256_and_ps(v, _mm256_cmp_ps(v, vw, _CMP_GE_OQ));
        acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    double lanes[4];
    int32_t counts[8];
    _mm256_storeu_pd(lanes, _mm256_add_pd(acc0, acc1));
    _mm256_storeu_si256((__m256i *)counts, same);
    double sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    int64_t count = 0;
    for (int j = 0; j < 8; j++) count += counts[j];
    for (; i < n; i++) {
        if (e[i] >= w) sum += e[i];
        count += e[i] == w;
    }
    *equal = count;
    return sum;
}

/* the first index i >= from with x[i] > threshold, or n (8 at a time) */
FL_AVX2 static int64_t next_above_avx2(const float *x, int64_t from, int64_t n, float threshold) {
    const __m256 vt = _mm256_set1_ps(threshold);
    int64_t i = from;
    for (; i + 8 <= n; i += 8) {
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vt, _CMP_GT_OQ));
        if (mask) return i + __builtin_ctz(mask);
    }
    for (; i < n; i++)
        if (x[i] > threshold) return i;
    return n;
}

/* One pass over x[0:n) rounded down to 16: the largest value and the first index holding it (*best, *arg; kept
 * when nothing there is larger than *best), *nan_seen set if an entry is NaN. Two chains of 8 lanes, each lane
 * keeping its first maximum; returns where it stopped. */
FL_AVX2 static int64_t max_avx2(const float *x, int64_t n, float *best, int64_t *arg, int64_t *nan_seen) {
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, nan = _mm256_setzero_ps();
    __m256i i0 = _mm256_setzero_si256(), i1 = i0;
    __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i eight = _mm256_set1_epi32(8), sixteen = _mm256_set1_epi32(16);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
        __m256 ga = _mm256_cmp_ps(a, m0, _CMP_GT_OQ), gb = _mm256_cmp_ps(b, m1, _CMP_GT_OQ);
        m0 = _mm256_blendv_ps(m0, a, ga);
        m1 = _mm256_blendv_ps(m1, b, gb);
        i0 = _mm256_blendv_epi8(i0, at, _mm256_castps_si256(ga));
        i1 = _mm256_blendv_epi8(i1, _mm256_add_epi32(at, eight), _mm256_castps_si256(gb));
        at = _mm256_add_epi32(at, sixteen);
    }
    float values[16];
    int32_t ids[16];
    _mm256_storeu_ps(values, m0);
    _mm256_storeu_ps(values + 8, m1);
    _mm256_storeu_si256((__m256i *)ids, i0);
    _mm256_storeu_si256((__m256i *)(ids + 8), i1);
    for (int j = 0; j < 16; j++)
        if (values[j] > *best || (values[j] == *best && values[j] > -INFINITY && ids[j] < *arg)) {
            *best = values[j];
            *arg = ids[j];
        }
    *nan_seen |= _mm256_movemask_ps(nan) != 0;
    return i;
}

/* how many of x[0:n) equal v */
FL_AVX2 static int64_t count_equal_avx2(const float *x, int64_t n, float v) {
    const __m256 vv = _mm256_set1_ps(v);
    __m256i same = _mm256_setzero_si256();
    int64_t i = 0, count = 0;
    for (; i + 8 <= n; i += 8)
        same = _mm256_sub_epi32(same, _mm256_castps_si256(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vv, _CMP_EQ_OQ)));
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, same);
    for (int j = 0; j < 8; j++) count += lanes[j];
    for (; i < n; i++) count += x[i] == v;
    return count;
}

/* the ids of x[0:n) >= threshold, in order, the first `cap` of them into ids; returns how many there are */
FL_AVX2 static int64_t at_least_avx2(const float *x, int64_t n, float threshold, int64_t *ids, int64_t cap) {
    const __m256 vt = _mm256_set1_ps(threshold);
    int64_t i = 0, count = 0;
    for (; i + 8 <= n; i += 8) {
        unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vt, _CMP_GE_OQ));
        for (; mask; mask &= mask - 1, count++)
            if (count < cap) ids[count] = i + __builtin_ctz(mask);
    }
    for (; i < n; i++)
        if (x[i] >= threshold) {
            if (count < cap) ids[count] = i;
            count++;
        }
    return count;
}

/* -- AVX-512 bodies (the same arithmetic 16 lanes at a time: each exp is bit-identical to exp8's) -------------- */
#define FL_AVX512 __attribute__((target("avx512f,avx2,fma")))

FL_AVX512 static __m512 exp16(__m512 x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(FL_EXP_LO), _CMP_NLT_UQ);  /* NaN kept */
    x = _mm512_min_ps(_mm512_set1_ps(FL_EXP_HI), x);
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    __m512 shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(FL_LOG2E), magic);
    __m512 n = _mm512_sub_ps(shifted, magic);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(FL_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(FL_LN2_LO), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512i bits = _mm512_add_epi32(_mm512_slli_epi32(_mm512_castps_si512(shifted), 23), _mm512_set1_epi32(127 << 23));
    return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(bits));
}

FL_AVX512 static float exp_block_avx512(const float *x, float *e, int64_t n, float scale, float offset) {
    const __m512 vs = _mm512_set1_ps(scale), vo = _mm512_set1_ps(offset);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {  /* four independent exps in flight */
        __m512 a = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(x + i), vs, vo));
        __m512 b = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(x + i + 16), vs, vo));
        __m512 c = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(x + i + 32), vs, vo));
        __m512 d = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(x + i + 48), vs, vo));
        _mm512_storeu_ps(e + i, a);
        _mm512_storeu_ps(e + i + 16, b);
        _mm512_storeu_ps(e + i + 32, c);
        _mm512_storeu_ps(e + i + 48, d);
        acc0 = _mm512_add_ps(acc0, a);
        acc1 = _mm512_add_ps(acc1, b);
        acc2 = _mm512_add_ps(acc2, c);
        acc3 = _mm512_add_ps(acc3, d);
    }
    acc0 = _mm512_add_ps(acc0, acc2);
    acc1 = _mm512_add_ps(acc1, acc3);
    for (; i + 16 <= n; i += 16) {
        __m512 a = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(x + i), vs, vo));
        _mm512_storeu_ps(e + i, a);
        acc0 = _mm512_add_ps(acc0, a);
    }
    if (i < n) {  /* the tail under a mask: the same exp as the full vectors */
        const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
        __m512 a = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, x + i), vs, vo));
        _mm512_mask_storeu_ps(e + i, tail, a);
        acc1 = _mm512_add_ps(acc1, _mm512_maskz_mov_ps(tail, a));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* reaching_avx2's sum and count, 16 lanes at a time */
FL_AVX512 static double reaching_avx512(const float *e, int64_t n, float w, int64_t *equal) {
    const __m512 vw = _mm512_set1_ps(w);
    __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
    int64_t i = 0, count = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(e + i);
        count += __builtin_popcount((unsigned)_mm512_cmp_ps_mask(v, vw, _CMP_EQ_OQ));
        v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, vw, _CMP_GE_OQ), v);
        acc0 = _mm512_add_pd(acc0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
        acc1 = _mm512_add_pd(acc1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    }
    double sum = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
    for (; i < n; i++) {
        if (e[i] >= w) sum += e[i];
        count += e[i] == w;
    }
    *equal = count;
    return sum;
}

/* max_avx2's pass, 32 at a time (two chains of 16 lanes); returns where it stopped (n rounded down to 32) */
FL_AVX512 static int64_t max_avx512(const float *x, int64_t n, float *best, int64_t *arg, int64_t *nan_seen) {
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    __m512i i0 = _mm512_setzero_si512(), i1 = i0;
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sixteen = _mm512_set1_epi32(16), thirty_two = _mm512_set1_epi32(32);
    __mmask16 nan = 0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
        nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
        __mmask16 ga = _mm512_cmp_ps_mask(a, m0, _CMP_GT_OQ), gb = _mm512_cmp_ps_mask(b, m1, _CMP_GT_OQ);
        m0 = _mm512_mask_mov_ps(m0, ga, a);
        m1 = _mm512_mask_mov_ps(m1, gb, b);
        i0 = _mm512_mask_mov_epi32(i0, ga, at);
        i1 = _mm512_mask_mov_epi32(i1, gb, _mm512_add_epi32(at, sixteen));
        at = _mm512_add_epi32(at, thirty_two);
    }
    float values[32];
    int32_t ids[32];
    _mm512_storeu_ps(values, m0);
    _mm512_storeu_ps(values + 16, m1);
    _mm512_storeu_si512(ids, i0);
    _mm512_storeu_si512(ids + 16, i1);
    for (int j = 0; j < 32; j++)
        if (values[j] > *best || (values[j] == *best && values[j] > -INFINITY && ids[j] < *arg)) {
            *best = values[j];
            *arg = ids[j];
        }
    *nan_seen |= nan != 0;
    return i;
}

/* the widest bodies this CPU runs: 2 AVX-512, 1 AVX2 + FMA, 0 scalar (fl_limit lowers it, for tests) */
static int isa = -1;

static int isa_level(void) {
    if (isa < 0) {
        __builtin_cpu_init();
        int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        isa = avx2 ? 1 + (__builtin_cpu_supports("avx512f") != 0) : 0;
    }
    return isa;
}

static int use_avx2(void) { return isa_level() >= 1; }
static int use_avx512(void) { return isa_level() >= 2; }
#endif

static float exp_block(const float *x, float *e, int64_t n, float scale, float offset) {
#ifdef FL_X86
    if (use_avx512()) return exp_block_avx512(x, e, n, scale, offset);
    if (use_avx2()) return exp_block_avx2(x, e, n, scale, offset);
#endif
    return exp_block_scalar(x, e, n, scale, offset);
}

static int64_t count_equal(const float *x, int64_t n, float v) {
#ifdef FL_X86
    if (use_avx2()) return count_equal_avx2(x, n, v);
#endif
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) count += x[i] == v;
    return count;
}

static int64_t at_least(const float *x, int64_t n, float threshold, int64_t *ids, int64_t cap) {
#ifdef FL_X86
    if (use_avx2()) return at_least_avx2(x, n, threshold, ids, cap);
#endif
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++)
        if (x[i] >= threshold) {
            if (count < cap) ids[count] = i;
            count++;
        }
    return count;
}

static int64_t next_above(const float *x, int64_t from, int64_t n, float threshold) {
#ifdef FL_X86
    if (use_avx2()) return next_above_avx2(x, from, n, threshold);
#endif
    for (int64_t i = from; i < n; i++)
        if (x[i] > threshold) return i;
    return n;
}

/* -- the entry points ---------------------------------------------------------------------------------------- */

/* 2 where the AVX-512 bodies run, 1 where the AVX2 + FMA ones do, 0 where the scalar ones do */
int fl_vectorised(void) {
#ifdef FL_X86
    return isa_level();
#else
    return 0;
#endif
}

/* run no wider bodies than `level` (as fl_vectorised counts) from now on; returns the level in force. For tests
 * that compare the bodies on one machine: not thread-safe against calls running at the same time. */
int fl_limit(int level) {
#ifdef FL_X86
    isa = -1;
    int widest = isa_level();
    isa = level < widest ? (level < 0 ? 0 : level) : widest;
    return isa;
#else
    (void)level;
    return 0;
#endif
}

/* -- helper threads ------------------------------------------------------------------------------------------ */
#define FL_MAX_THREADS 16

typedef void (*part_fn)(const void *job, int64_t part, int64_t parts);  /* does part `part` of `parts` of a job */

/* A helper that finished a part polls for the next job for ~FL_SPIN pauses (tens of microseconds: the passes of
 * one sampling step come a few microseconds apart) before it sleeps on the condition variable; waking a sleeping
 * thread costs 15-25 us on a 2-core VM (measured), more than a pass over 8 rows saves. */
#define FL_SPIN 2000

static void relax(void) {
#ifdef FL_X86
    _mm_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static struct {
    pthread_mutex_t lock;  /* guards the fields below (generation and pending are also read without it) */
    pthread_cond_t go, done;
    pthread_mutex_t busy;  /* held by the call using the helpers; a concurrent call runs on its own thread */
    int helpers;           /* started so far */
    int sleeping;          /* helpers waiting on `go` */
    uint64_t generation;   /* bumped for each job (atomically, after the job's fields are written) */
    int pending;           /* helpers still working on the current job (decremented atomically) */
    part_fn fn;
    const void *job;       /* the caller's, alive until every part is done */
    int64_t parts;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
          0, 0, 0, 0, NULL, NULL, 0};

static uint64_t born[FL_MAX_THREADS];  /* the generation when each helper was started: it takes the next ones */

static void *helper(void *arg) {
    const int64_t part = (int64_t)(intptr_t)arg;  /* 1 .. helpers: part 0 is the caller's */
    uint64_t seen = born[part];
    for (;;) {
        for (int spin = 0; spin < FL_SPIN && __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE) == seen; spin++)
            relax();
        pthread_mutex_lock(&pool.lock);
        while (pool.generation == seen) {
            pool.sleeping++;
            pthread_cond_wait(&pool.go, &pool.lock);
            pool.sleeping--;
        }
        seen = pool.generation;
        part_fn fn = pool.fn;
        const void *job = pool.job;
        int64_t parts = pool.parts;
        pthread_mutex_unlock(&pool.lock);
        if (part < parts) {
            fn(job, part, parts);
            if (__atomic_sub_fetch(&pool.pending, 1, __ATOMIC_ACQ_REL) == 0) {
                pthread_mutex_lock(&pool.lock);
                pthread_cond_signal(&pool.done);
                pthread_mutex_unlock(&pool.lock);
            }
        }
    }
    return NULL;
}

static void forget_helpers(void) {  /* in a forked child: the helpers were not copied */
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.busy, NULL);
    pthread_cond_init(&pool.go, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.helpers = 0;
    pool.sleeping = 0;
    pool.pending = 0;
}

/* Start helpers up to `want` (caller holds pool.lock); returns how many there are. */
static int start_helpers(int want) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, forget_helpers);
        registered = 1;
    }
    while (pool.helpers < want) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 1 << 16);
        born[pool.helpers + 1] = pool.generation;
        int failed = pthread_create(&thread, &attr, helper, (void *)(intptr_t)(pool.helpers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.helpers++;
    }
    return pool.helpers;
}

/* fn(job, part, parts) for every part, on this thread and up to threads - 1 helpers; returns when all are done. */
static void run_parts(part_fn fn, const void *job, int64_t threads) {
    if (threads > FL_MAX_THREADS) threads = FL_MAX_THREADS;
    if (threads <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        fn(job, 0, 1);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    const int64_t parts = 1 + min64(start_helpers((int)threads - 1), threads - 1);
    if (parts > 1) {
        pool.fn = fn;
        pool.job = job;
        pool.parts = parts;
        __atomic_store_n(&pool.pending, (int)parts - 1, __ATOMIC_RELAXED);
        __atomic_store_n(&pool.generation, pool.generation + 1, __ATOMIC_RELEASE);
        if (pool.sleeping) pthread_cond_broadcast(&pool.go);
    }
    pthread_mutex_unlock(&pool.lock);
    fn(job, 0, parts);
    for (int spin = 0; spin < FL_SPIN && __atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0; spin++) relax();
    if (__atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0) {
        pthread_mutex_lock(&pool.lock);
        while (__atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0) pthread_cond_wait(&pool.done, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
    }
    pthread_mutex_unlock(&pool.busy);
}

/* -- exp over rows -------------------------------------------------------------------------------------------- */
struct exp_job {  /* the (row, block) pairs of all rows, numbered row by row, split in equal parts */
    const float *x;
    float *e;
    int64_t x_stride, e_stride, rows, vocab, block, blocks;  /* blocks: full ones per row; a short one may follow */
    const float *scale, *offset;
    double *cum;  /* cum[r * (blocks + 1) + b] = the sum of block b of row r (made running after) */
};

static void exp_part(const void *arg, int64_t part, int64_t parts) {
    const struct exp_job *job = arg;
    const int64_t per_row = job->blocks + 1, total = job->rows * per_row;
    const int64_t first = total * part / parts, last = total * (part + 1) / parts;
    for (int64_t i = first; i < last; i++) {
        const int64_t r = i / per_row, b = i % per_row, start = b * job->block;
        const int64_t n = b < job->blocks ? job->block : job->vocab - start;
        job->cum[i] = exp_block(job->x + r * job->x_stride + start, job->e + r * job->e_stride + start, n,
                                job->scale[r], job->offset[r]);
    }
}

/* For each of `rows` rows: e = exp(x * scale[r] - offset[r]) (vocab entries; row strides x_stride / e_stride in
 * floats), and cum (rows, vocab / block + 1) float64: cum[r, b] = the sum of blocks 0..b of row r (float32 block
 * sums, float64 running sum); the last entry takes the short block at the end, if any, so it is the row's total.
 * `threads` > 1: the blocks are split over that many threads (this one and helpers). */
void fl_exp_rows(const float *x, int64_t x_stride, float *e, int64_t e_stride, int64_t rows, int64_t vocab,
                 const float *scale, const float *offset, int64_t block, double *cum, int64_t threads) {
    struct exp_job job = {x, e, x_stride, e_stride, rows, vocab, block, vocab / block, scale, offset, cum};
    run_parts(exp_part, &job, threads);
    for (int64_t r = 0; r < rows; r++) {  /* block sums -> running sums */
        double *cr = cum + r * (job.blocks + 1), running = 0.0;
        for (int64_t b = 0; b <= job.blocks; b++) cr[b] = running += cr[b];
    }
}

/* -- max and argmax over rows --------------------------------------------------------------------------------- */
static void max_row(const float *x, int64_t n, float *max_out, int64_t *arg_out) {
    /* as numpy: the first NaN if there is one, else the first index of the largest value (0 if all are -inf) */
    int64_t i = 0, nan_seen = 0, arg = 0;
    float best = -INFINITY;
#ifdef FL_X86
    if (use_avx512()) i = max_avx512(x, n, &best, &arg, &nan_seen);
    else if (use_avx2()) i = max_avx2(x, n, &best, &arg, &nan_seen);
#endif
    for (; i < n; i++) {
        if (x[i] != x[i]) nan_seen = 1;
        else if (x[i] > best) {
            best = x[i];
            arg = i;
        }
    }
    if (nan_seen) {
        for (i = 0; i < n && x[i] == x[i]; i++) {}
        *max_out = x[i];
        *arg_out = i;
        return;
    }
    *max_out = best;
    *arg_out = arg;
}

struct max_job {
    const float *x;
    int64_t stride, vocab, m;
    const int64_t *rows;
    float *max_out;
    int64_t *arg_out;
};

static void max_part(const void *arg, int64_t part, int64_t parts) {
    const struct max_job *job = arg;
    for (int64_t j = job->m * part / parts; j < job->m * (part + 1) / parts; j++)
        max_row(job->x + job->rows[j] * job->stride, job->vocab, job->max_out + j, job->arg_out + j);
}

/* For each of the m rows rows[j] of x (stride floats apart): its largest value and the first id holding it (a row
 * with NaN: NaN and the first NaN's id, as numpy's max and argmax). */
void fl_max_rows(const float *x, int64_t stride, const int64_t *rows, int64_t m, int64_t vocab, float *max_out,
                 int64_t *arg_out, int64_t threads) {
    struct max_job job = {x, stride, vocab, m, rows, max_out, arg_out};
    run_parts(max_part, &job, threads);
}

/* -- inverse-CDF draws over rows ------------------------------------------------------------------------------ */
static int inside(const float *e, int64_t n, int64_t token, double need);
static int64_t search(const float *e, int64_t n, double target);

static int64_t draw_row(const float *e, const double *cum, int64_t vocab, int64_t block, double u) {
    const int64_t blocks = vocab / block;
    const double target = u * cum[blocks];
    int64_t lo = 0, hi = blocks + 1;  /* the first b with cum[b] > target (numpy's searchsorted, side right) */
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (cum[mid] > target) hi = mid;
        else lo = mid + 1;
    }
    int64_t b = min64(lo, blocks);
    while (b > 0 && cum[b] == cum[b - 1]) b--;  /* an empty block (rounding at the end) */
    const int64_t start = b * block, size = min64(block, vocab - start);
    int64_t at = search(e + start, size, target - (b ? cum[b - 1] : 0.0));
    if (at >= size) {  /* rounding past the block's end: its last likely token */
        for (at = size - 1; at > 0 && e[start + at] == 0.0f; at--) {}
    }
    return start + at;
}

struct draw_job {
    const float *e;
    int64_t e_stride;
    const double *cum;
    int64_t cum_stride, vocab, block, m;
    const int64_t *ks;
    const double *us, *needs;
    int64_t *tokens, *kept;
};

static void draw_part(const void *arg, int64_t part, int64_t parts) {
    const struct draw_job *job = arg;
    for (int64_t j = job->m * part / parts; j < job->m * (part + 1) / parts; j++) {
        const float *e = job->e + job->ks[j] * job->e_stride;
        const int64_t token = draw_row(e, job->cum + job->ks[j] * job->cum_stride, job->vocab, job->block, job->us[j]);
        job->tokens[j] = token;
        job->kept[j] = job->needs[j] < 0 || inside(e, job->vocab, token, job->needs[j]);
    }
}

/* For each of the m rows ks[j] of e (e_stride floats apart; their running block sums cum, cum_stride apart, as
 * fl_exp_rows makes them): the id where u[j] * total falls (the block by binary search, then the running sum inside
 * it), and whether it is kept: always where needs[j] < 0, else when inside the nucleus of mass needs[j] (top-p). */
void fl_draw_rows(const float *e, int64_t e_stride, const double *cum, int64_t cum_stride, const int64_t *ks,
                  const double *us, const double *needs, int64_t m, int64_t vocab, int64_t block, int64_t *tokens,
                  int64_t *kept, int64_t threads) {
    struct draw_job job = {e, e_stride, cum, cum_stride, vocab, block, m, ks, us, needs, tokens, kept};
    run_parts(draw_part, &job, threads);
}

/* The first i in [0, n) where the float64 running sum of e[0..i] is > target; n when none is (the caller's
 * rounding at the block's end). */
static int64_t search(const float *e, int64_t n, double target) {
    double running = 0.0;
    for (int64_t i = 0; i < n; i++) {
        running += e[i];
        if (running > target) return i;
    }
    return n;
}

/* The sum (float64) of the entries of e[0:n] that are >= w, and in *equal how many are == w. */
static double reaching(const float *e, int64_t n, float w, int64_t *equal) {
#ifdef FL_X86
    if (use_avx512()) return reaching_avx512(e, n, w, equal);
    if (use_avx2()) return reaching_avx2(e, n, w, equal);
#endif
    return reaching_scalar(e, n, w, equal);
}

/* Whether `token` is inside the nucleus of mass `need` of the weights e[0:n): the mass ahead of it in decreasing
 * order (every larger weight, and the equal ones with a smaller id) is below need. */
static int inside(const float *e, int64_t n, int64_t token, double need) {
    const float w = e[token];
    int64_t equal = 0;
    const double mass = reaching(e, n, w, &equal);  /* its own weight and all its ties included */
    if (mass - w < need) return 1;
    if (equal <= 1) return 0;
    int64_t before = 0;
    for (int64_t i = 0; i < token; i++) before += e[i] == w;
    return mass - (double)w * (double)equal + (double)w * (double)before < need;
}

/* The k largest entries of x[0:n] into ids / values (k each), largest first, equal values by the smaller id;
 * NaN never counts. Returns k, or how many there were when fewer than k entries are above -inf. */
static int64_t top(const float *x, int64_t n, int64_t k, int64_t *ids, float *values) {
    int64_t have = 0;
    float threshold = -INFINITY;  /* the k-th largest so far once `have` == k: only a larger value enters */
    for (int64_t i = next_above(x, 0, n, threshold); i < n; i = next_above(x, i + 1, n, threshold)) {
        const float v = x[i];
        int64_t at = min64(have, k - 1);  /* insert after every kept value >= v (they came first or are larger) */
        while (at > 0 && values[at - 1] < v) at--;
        int64_t last = min64(have, k - 1);
        memmove(values + at + 1, values + at, (size_t)(last - at) * sizeof *values);
        memmove(ids + at + 1, ids + at, (size_t)(last - at) * sizeof *ids);
        values[at] = v;
        ids[at] = i;
        if (have < k) have++;
        if (have == k) threshold = values[k - 1];
    }
    return have;
}

int64_t fl_search(const float *e, int64_t n, double target) { return search(e, n, target); }

double fl_reaching(const float *e, int64_t n, float w) {
    int64_t equal;
    return reaching(e, n, w, &equal);
}

int fl_inside(const float *e, int64_t n, int64_t token, double need) { return inside(e, n, token, need); }

int64_t fl_top(const float *x, int64_t n, int64_t k, int64_t *ids, float *values) { return top(x, n, k, ids, values); }

/* -- candidates over rows (top-k, min-p) ---------------------------------------------------------------------- */
struct candidates_job {
    const float *x;
    int64_t stride, vocab, m, width;
    const int64_t *rows, *ks;
    const float *thresholds;
    int64_t *ids;
    float *values;
    int64_t *counts;
};

static void top_part(const void *arg, int64_t part, int64_t parts) {
    const struct candidates_job *job = arg;
    for (int64_t j = job->m * part / parts; j < job->m * (part + 1) / parts; j++) {
        const float *x = job->x + job->rows[j] * job->stride;
        int64_t *ids = job->ids + j * job->width;
        float *values = job->values + j * job->width;
        const int64_t k = job->ks[j], have = top(x, job->vocab, job->width, ids, values);
        int64_t complete = have >= k;
        if (complete) {  /* every entry equal to the k-th largest is among the first k */
            int64_t inside = 0;
            for (int64_t i = 0; i < k; i++) inside += values[i] == values[k - 1];
            complete = count_equal(x, job->vocab, values[k - 1]) == inside;
        }
        job->counts[j] = complete;
    }
}

/* For each of the m rows rows[j] of x (stride floats apart): its `width` largest entries (ids, values: (m, width),
 * largest first, ties by id), and counts[j] = 1 when the first ks[j] of them hold every entry equal to the ks[j]-th
 * (so they are the top-k with all its ties), else 0. */
void fl_top_rows(const float *x, int64_t stride, const int64_t *rows, int64_t m, int64_t vocab, const int64_t *ks,
                 int64_t width, int64_t *ids, float *values, int64_t *counts, int64_t threads) {
    struct candidates_job job = {x, stride, vocab, m, width, rows, ks, NULL, ids, values, counts};
    run_parts(top_part, &job, threads);
}

static void at_least_part(const void *arg, int64_t part, int64_t parts) {
    const struct candidates_job *job = arg;
    for (int64_t j = job->m * part / parts; j < job->m * (part + 1) / parts; j++)
        job->counts[j] = at_least(job->x + job->rows[j] * job->stride, job->vocab, job->thresholds[j],
                                  job->ids + j * job->width, job->width);
}

/* For each of the m rows rows[j] of x: the ids of its entries >= thresholds[j] in id order, the first `width` into
 * ids (m, width), and how many there are in counts[j] (more than width: the rest were not written). */
void fl_at_least_rows(const float *x, int64_t stride, const int64_t *rows, int64_t m, int64_t vocab,
                      const float *thresholds, int64_t width, int64_t *ids, int64_t *counts, int64_t threads) {
    struct candidates_job job = {x, stride, vocab, m, width, rows, NULL, thresholds, ids, NULL, counts};
    run_parts(at_least_part, &job, threads);
}
