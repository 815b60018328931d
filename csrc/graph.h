// A kernel graph: the kernel calls of one decode step, recorded once while the step runs from Python and
// replayed from C++ on later steps, so a step of a small model no longer pays Python's per-call cost
// (argument parsing, shape checks, allocations) on each of its hundreds of calls. Like a CUDA graph, it
// holds raw addresses: the caller keeps every recorded buffer alive and writes each step's inputs
// (positions, KV slots, block tables) into the same buffers before replaying.
#pragma once
#include <functional>
#include <vector>

namespace ironlm {

class KernelGraph {
public:
    // Starts recording this thread's kernel calls into this graph (they still run as they are recorded).
    void begin_capture();
    // Stops recording; the graph is ready to replay.
    void end_capture();
    // Runs every recorded call in order. The data-dependent checks (positions, slots, block tables) of all
    // calls run first, so inputs that would fail a check fail before any call has written anything.
    void replay() const;
    size_t size() const { return steps_.size(); }

    struct Step {
        std::function<void()> check;  // empty where a call has no checks on the data it reads
        std::function<void()> run;
    };
    void add(Step step) { steps_.push_back(std::move(step)); }

private:
    std::vector<Step> steps_;
    bool captured_ = false;
};

// The graph this thread is recording into, or nullptr.
KernelGraph* capturing_graph();

}  // namespace ironlm
