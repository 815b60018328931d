#include "graph.h"

#include <stdexcept>

namespace ironlm {
namespace {

// Which graph this thread records into, set only between begin_capture and end_capture (as a CUDA stream's
// capture mode): the kernel bindings are reached through Python wrappers and modules that know nothing of graphs,
// and threading a recorder through all of them would change every call site for one caller. Thread-local, so a
// capture on the engine's thread never records another thread's calls.
thread_local KernelGraph* t_capturing = nullptr;

}  // namespace

KernelGraph* capturing_graph() { return t_capturing; }

void KernelGraph::begin_capture() {
    if (t_capturing) throw std::runtime_error("KernelGraph: this thread is already capturing a graph");
    if (captured_) throw std::runtime_error("KernelGraph: this graph is already captured; make a new one");
    t_capturing = this;
}

void KernelGraph::end_capture() {
    if (t_capturing != this) throw std::runtime_error("KernelGraph: this graph is not capturing");
    t_capturing = nullptr;
    captured_ = true;
}

void KernelGraph::replay() const {
    if (!captured_) throw std::runtime_error("KernelGraph: replay before the capture has ended");
    for (const Step& step : steps_)
        if (step.check) step.check();
    for (const Step& step : steps_) step.run();
}

}  // namespace ironlm
