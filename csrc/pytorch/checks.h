// Input checks shared by every op family: each failure names the argument and the problem,
// so bad input gives a Python RuntimeError, never a crash or an out-of-bounds read.
#pragma once
#include <torch/extension.h>

#define MMBOAT_CHECK_DEFINED(x) TORCH_CHECK((x).defined(), #x " must be a tensor")
#define MMBOAT_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous, got strides ", (x).strides())
#define MMBOAT_CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dimensions, got shape ", (x).sizes())
#define MMBOAT_CHECK_SAME_DTYPE(x, y)                                                      \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y                        \
              " must have the same dtype, got ", (x).scalar_type(), " and ", (y).scalar_type())
#define MMBOAT_CHECK_SAME_DEVICE(x, y)                                                    \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", \
              (x).device(), " and ", (y).device())
#define MMBOAT_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define MMBOAT_CHECK_CUDA(x) TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor")
