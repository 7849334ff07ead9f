/* The sampler's full-vocabulary passes in C (fastllm/native_sampling.py loads this with ctypes; no Python API).
 *
 * Every function reads and writes caller-owned float32 / float64 / int64 buffers and allocates nothing:
 *   fl_exp_rows   e = exp(x * scale - offset) over rows of logits, with the running float64 sums of its blocks
 *   fl_search     inverse CDF inside one block: the first index whose running sum passes a target
 *   fl_reaching   the mass of the weights >= w (the top-p check of a drawn token)
 *   fl_top        the k largest values of a row, largest first, ties by the smaller id
 * The vectorised bodies are compiled for AVX2 + FMA (a target attribute, not a build flag), chosen at run time by
 * the CPU's flags; other CPUs take the scalar bodies, same arithmetic up to rounding. exp is Cody-Waite range
 * reduction to |r| <= ln2 / 2 and the degree-7 Taylor polynomial there (relative error < 1e-8 before rounding):
 * below -87.3 it is 0 (no denormals), NaN stays NaN.
 * A large fl_exp_rows call is split over a few helper threads of its own (made on first use, asleep between calls,
 * never spinning, so they hold no core the model's session needs).
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

static double reaching_scalar(const float *e, int64_t n, float w) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        if (e[i] >= w) sum += e[i];
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

FL_AVX2 static double reaching_avx2(const float *e, int64_t n, float w) {
    const __m256 vw = _mm256_set1_ps(w);
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(e + i);
        v = _mm256_and_ps(v, _mm256_cmp_ps(v, vw, _CMP_GE_OQ));
        acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(acc0, acc1));
    double sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    for (; i < n; i++)
        if (e[i] >= w) sum += e[i];
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

static int use_avx2(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return known;
}
#endif

static float exp_block(const float *x, float *e, int64_t n, float scale, float offset) {
#ifdef FL_X86
    if (use_avx2()) return exp_block_avx2(x, e, n, scale, offset);
#endif
    return exp_block_scalar(x, e, n, scale, offset);
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

/* 1 where the vectorised bodies run, 0 where the scalar ones do */
int fl_vectorised(void) {
#ifdef FL_X86
    return use_avx2();
#else
    return 0;
#endif
}

/* -- the helper threads of fl_exp_rows ------------------------------------------------------------------------ */
#define FL_MAX_THREADS 16

struct exp_job {  /* one call: the (row, block) pairs of all rows, numbered row by row, split in equal parts */
    const float *x;
    float *e;
    int64_t x_stride, e_stride, vocab, block, blocks;  /* blocks: full ones per row; a short one may follow */
    const float *scale, *offset;
    double *cum;  /* cum[r * (blocks + 1) + b] = the sum of block b of row r (then made running by the caller) */
    int64_t parts;
};

static void exp_part(const struct exp_job *job, int64_t part, int64_t rows) {
    const int64_t per_row = job->blocks + 1, total = rows * per_row;
    const int64_t first = total * part / job->parts, last = total * (part + 1) / job->parts;
    for (int64_t i = first; i < last; i++) {
        const int64_t r = i / per_row, b = i % per_row, start = b * job->block;
        const int64_t n = b < job->blocks ? job->block : job->vocab - start;
        job->cum[i] = exp_block(job->x + r * job->x_stride + start, job->e + r * job->e_stride + start, n,
                                job->scale[r], job->offset[r]);
    }
}

static struct {
    pthread_mutex_t lock;  /* guards the fields below */
    pthread_cond_t go, done;
    pthread_mutex_t busy;  /* held by the call using the helpers; a concurrent call runs on its own thread */
    int helpers;           /* started so far */
    uint64_t generation;   /* bumped for each job */
    int pending;           /* helpers still working on the current job */
    struct exp_job job;
    int64_t rows;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
          0, 0, 0, {0}, 0};

static uint64_t born[FL_MAX_THREADS];  /* the generation when each helper was started: it takes the next ones */

static void *helper(void *arg) {
    const int64_t part = (int64_t)(intptr_t)arg;  /* 1 .. helpers: part 0 is the caller's */
    pthread_mutex_lock(&pool.lock);
    uint64_t seen = born[part];
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.go, &pool.lock);
        seen = pool.generation;
        if (part < pool.job.parts) {
            struct exp_job job = pool.job;
            int64_t rows = pool.rows;
            pthread_mutex_unlock(&pool.lock);
            exp_part(&job, part, rows);
            pthread_mutex_lock(&pool.lock);
            if (--pool.pending == 0) pthread_cond_signal(&pool.done);
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

/* For each of `rows` rows: e = exp(x * scale[r] - offset[r]) (vocab entries; row strides x_stride / e_stride in
 * floats), and cum (rows, vocab / block + 1) float64: cum[r, b] = the sum of blocks 0..b of row r (float32 block
 * sums, float64 running sum); the last entry takes the short block at the end, if any, so it is the row's total.
 * `threads` > 1: the blocks are split over that many threads (this one and helpers). */
void fl_exp_rows(const float *x, int64_t x_stride, float *e, int64_t e_stride, int64_t rows, int64_t vocab,
                 const float *scale, const float *offset, int64_t block, double *cum, int64_t threads) {
    struct exp_job job = {x, e, x_stride, e_stride, vocab, block, vocab / block, scale, offset, cum, 1};
    if (threads > FL_MAX_THREADS) threads = FL_MAX_THREADS;
    if (threads > 1 && pthread_mutex_trylock(&pool.busy) == 0) {
        pthread_mutex_lock(&pool.lock);
        job.parts = 1 + start_helpers((int)threads - 1);
        if (job.parts > 1) {
            pool.job = job;
            pool.rows = rows;
            pool.pending = (int)job.parts - 1;
            pool.generation++;
            pthread_cond_broadcast(&pool.go);
        }
        pthread_mutex_unlock(&pool.lock);
        exp_part(&job, 0, rows);
        pthread_mutex_lock(&pool.lock);
        while (pool.pending > 0) pthread_cond_wait(&pool.done, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
        pthread_mutex_unlock(&pool.busy);
    } else {
        exp_part(&job, 0, rows);
    }
    for (int64_t r = 0; r < rows; r++) {  /* block sums -> running sums */
        double *cr = cum + r * (job.blocks + 1), running = 0.0;
        for (int64_t b = 0; b <= job.blocks; b++) cr[b] = running += cr[b];
    }
}

/* The first i in [0, n) where the float64 running sum of e[0..i] is > target; n when none is (the caller's
 * rounding at the block's end). */
int64_t fl_search(const float *e, int64_t n, double target) {
    double running = 0.0;
    for (int64_t i = 0; i < n; i++) {
        running += e[i];
        if (running > target) return i;
    }
    return n;
}

/* The sum (float64) of the entries of e[0:n] that are >= w. */
double fl_reaching(const float *e, int64_t n, float w) {
#ifdef FL_X86
    if (use_avx2()) return reaching_avx2(e, n, w);
#endif
    return reaching_scalar(e, n, w);
}

/* The k largest entries of x[0:n] into ids / values (k each), largest first, equal values by the smaller id;
 * NaN never counts. Returns k, or how many there were when fewer than k entries are above -inf. */
int64_t fl_top(const float *x, int64_t n, int64_t k, int64_t *ids, float *values) {
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
