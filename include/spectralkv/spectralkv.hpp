#pragma once
// Everything of the host API in one include.

#include "spectralkv/attention.hpp"
#include "spectralkv/cache.hpp"
#include "spectralkv/compress.hpp"
#include "spectralkv/config.hpp"
#include "spectralkv/error.hpp"
#include "spectralkv/layout.cuh"
#include "spectralkv/memory_stats.hpp"
#include "spectralkv/metrics.hpp"
#include "spectralkv/numeric.hpp"
#include "spectralkv/tensor.hpp"
