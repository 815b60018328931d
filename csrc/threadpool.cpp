#include "threadpool.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

namespace ironlm {
namespace {

// About 2-5 ms of pause loops before an idle worker sleeps: long enough to bridge the Python between
// two kernel calls and between two decode steps (a sleeping worker takes tens of microseconds to wake,
// and a small model's token makes hundreds of calls). The spin yields the core every kYieldEvery pauses,
// so PyTorch's threads (prefill attention) and other processes are not starved by it.
constexpr int kSpinIters = 100000;
constexpr int kYieldEvery = 64;
constexpr int kChunksPerThread = 4;

int default_threads() {
    // Online CPUs; hardware.py knows about SMT and sets the pool to physical cores.
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? static_cast<int>(n) : 1;
}

// One parallel_for call. Threads claim chunks from `next`, so a thread that the OS has
// descheduled (the cores are shared with PyTorch and other processes) delays at most the chunk
// it holds: the others take the rest. Shared ownership lets a late worker touch a finished job.
struct Job {
    RangeFn fn;
    void* ctx;
    int64_t n, chunk;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};

    void work() {
        for (;;) {
            const int64_t begin = next.fetch_add(chunk, std::memory_order_relaxed);
            if (begin >= n) return;
            const int64_t end = begin + chunk < n ? begin + chunk : n;
            fn(ctx, begin, end);
            done.fetch_add(end - begin, std::memory_order_release);
        }
    }
};

class Pool {
public:
    Pool() { start(default_threads()); }

    int size() const { return static_cast<int>(workers_.size()) + 1; }

    void resize(int n) {
        std::lock_guard<std::mutex> job_lock(job_mutex_);
        stop();
        start(n < 1 ? 1 : n);
    }

    void run(int64_t n, RangeFn fn, void* ctx) {
        std::unique_lock<std::mutex> job_lock(job_mutex_, std::try_to_lock);
        const int threads = size();
        if (!job_lock.owns_lock() || threads == 1 || n <= 1) {
            fn(ctx, 0, n);
            return;
        }
        auto job = std::make_shared<Job>();
        job->fn = fn;
        job->ctx = ctx;
        job->n = n;
        const int64_t chunks = static_cast<int64_t>(threads) * kChunksPerThread;
        job->chunk = (n + chunks - 1) / chunks;
        {
            std::lock_guard<std::mutex> lock(wake_mutex_);
            job_ = job;
            generation_.fetch_add(1, std::memory_order_release);
        }
        if (sleeping_.load(std::memory_order_acquire) > 0) wake_.notify_all();
        job->work();
        while (job->done.load(std::memory_order_acquire) != n) _mm_pause();
    }

private:
    void start(int n) {
        quit_ = false;
        // Workers start from the generation seen here, so a job or stop posted before a thread
        // gets scheduled is not missed.
        const uint64_t seen = generation_.load(std::memory_order_acquire);
        for (int i = 1; i < n; ++i) workers_.emplace_back([this, seen] { loop(seen); });
    }

    void stop() {
        {
            std::lock_guard<std::mutex> lock(wake_mutex_);
            quit_ = true;
            job_.reset();
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
    }

    void loop(uint64_t seen) {
        for (;;) {
            uint64_t now = seen;
            for (int i = 0; i < kSpinIters && now == seen; ++i) {
                _mm_pause();
                if (i % kYieldEvery == kYieldEvery - 1) sched_yield();
                now = generation_.load(std::memory_order_acquire);
            }
            std::shared_ptr<Job> job;
            {
                std::unique_lock<std::mutex> lock(wake_mutex_);
                if (now == seen) {
                    sleeping_.fetch_add(1, std::memory_order_acq_rel);
                    wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
                    sleeping_.fetch_sub(1, std::memory_order_acq_rel);
                }
                seen = generation_.load(std::memory_order_acquire);
                if (quit_) return;
                job = job_;
            }
            if (job) job->work();
        }
    }

    std::vector<std::thread> workers_;
    std::mutex job_mutex_;   // one job at a time; a second caller runs serially
    std::mutex wake_mutex_;  // guards job_, quit_ and sleeping workers
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> sleeping_{0};
    std::shared_ptr<Job> job_;
    bool quit_ = false;
};

// The pool is created on first use and never destroyed: joining workers at interpreter exit
// buys nothing, and a forked child must not join threads that exist only in its parent. The
// child drops the parent's pool (leaking it) and builds its own on first use.
std::atomic<Pool*> g_pool{nullptr};
std::mutex g_pool_mutex;

void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_release); }

Pool& pool() {
    Pool* p = g_pool.load(std::memory_order_acquire);
    if (p) return *p;
    static const int registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);
    (void)registered;
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    p = g_pool.load(std::memory_order_acquire);
    if (!p) {
        p = new Pool();
        g_pool.store(p, std::memory_order_release);
    }
    return *p;
}

}  // namespace

void parallel_for(int64_t n, RangeFn fn, void* ctx) { pool().run(n, fn, ctx); }
void set_num_threads(int n) { pool().resize(n); }
int num_threads() { return pool().size(); }

void* scratch_alloc(size_t bytes) { return std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64); }
void scratch_free(void* p) { std::free(p); }

}  // namespace ironlm
