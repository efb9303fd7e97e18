"""CUT's loss (arXiv 2312.14591, Eqs. 5-8; docs/cut.md): response log-probs -> L_CUT = L1 + L2.

Pure torch: no model, no tokenizer. Shapes: R sequences (rows) of a batch, B triples, N response
tokens per row, left-aligned (column t = t-th token of y, EOS included) as model(idx, positions,
targets) gives them; a float `mask` is 1 on y's real tokens, 0 on padding: N_b = mask[b].sum()
"""
import torch
import torch.nn.functional as F

MIN_1M_P = 1e-5  # floor on 1 - p_x inside log(1 - p_x): finite loss and gradient as p_x -> 1


def mle_loss(logp, mask):
    """Mean over rows of -(1/N_b) sum_t log p(y_t): L2 of a triple, and sft, sft_all, hindsight."""
    row_nll = -(mask * logp).sum(1) / mask.sum(1).clamp(min=1)  # a row without tokens contributes 0
    return row_nll.sum() / max(len(logp), 1)


def cut_loss(logp_x, logp_j, is_neg, mask, lam=2.0, alpha=1.0, gamma=0.0):
    """L_CUT = L1 + L2 per triple, averaged over the B triples. Returns (loss, stats).

    logp_x  (B, N): log p_x(t) = log p(y_t | y_<t, x)
    logp_j  (B, N): log p_n(t) = log p(y_t | y_<t, x, j-) on flawed rows (ignored elsewhere)
    is_neg  (B,)  : True for a flawed triple
    j+ is the absence of a judgment, as in the authors' code: p_p(t) = p(y_t|y_<t, x, j+) is p_x(t).
    """
    neg = is_neg[:, None]
    # L2 trains [x, j-] -> y on flawed triples and x -> y on acceptable ones.
    logp_l2 = torch.where(neg, logp_j, logp_x)
    neg_mask = mask * neg  # L1 exists only on the tokens of flawed responses
    with torch.no_grad():  # U and the weight are constants: no gradient flows through them
        U = (logp_l2.exp() - lam * logp_x.exp() > 0) & (neg_mask > 0)  # paper Eq. 5, p_p = p_x
        weight = alpha * logp_l2.exp() ** gamma  # alpha * p_n(t)^gamma, paper Eq. 6
    log_1m_px = torch.log((-torch.expm1(logp_x)).clamp(min=MIN_1M_P))  # log(1 - p_x) from log p_x
    # L1 = -(1/N) (sum_{t not in U} log p_x(t) + sum_{t in U} alpha p_n(t)^gamma log(1 - p_x(t)))
    l1_terms = torch.where(U, weight * log_1m_px, logp_x)
    loss = mle_loss(l1_terms, neg_mask) + mle_loss(logp_l2, mask)
    frac_unlikely = U.sum() / neg_mask.sum().clamp(min=1)  # the share of flawed tokens in U
    return loss, {'frac_unlikely': frac_unlikely.detach(), 'U': U}  # U (B, N): eval.py measures it


def dpo_loss(logp_w, logp_l, ref_w, ref_l, beta):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7), the mean over B pairs: (loss, stats).

    logp_w, logp_l (B,): log pi(y_w|x) and log pi(y_l|x), each summed over its response tokens;
    ref_w, ref_l (B,): the same under the reference model, the one training started from.
    loss = -log sigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l)))
    """
    margin = beta * ((logp_w - ref_w) - (logp_l - ref_l))
    accuracy = (margin > 0).float().mean().detach()
    stats = {'frac_unlikely': margin.new_zeros(()), 'reward_accuracy': accuracy}
    return -F.logsigmoid(margin).mean(), stats


def batch_loss(mode, logp, mask, x_rows, j_rows, is_neg, lam, alpha, gamma, ref_logp=None,
               beta=0.1):
    """The loss of `mode` (CUT or a baseline of the paper) on the rows of one batch: (loss, stats).

    logp, mask (R, N): see the top. For 'cut', triple b has its x -> y row x_rows[b] and its
    [x, j-] -> y row j_rows[b] (for an acceptable triple, j_rows[b] == x_rows[b]: a dummy). For
    'forward', x_rows[b] is x -> y and j_rows[b] is [x, y] -> j. For 'dpo' and 'ilf_dpo', x_rows[b]
    is the preferred response and j_rows[b] the other, and ref_logp (R, N) the reference model's
    logp. sft, sft_all, hindsight and ilf_mle are MLE on every row: the triple builder put only
    their rows in the batch.
    """
    if mode == 'cut':
        return cut_loss(logp[x_rows], logp[j_rows], is_neg, mask[x_rows], lam, alpha, gamma)
    if mode in ('dpo', 'ilf_dpo'):
        summed = (logp * mask).sum(1)
        ref = (ref_logp * mask).sum(1)
        return dpo_loss(summed[x_rows], summed[j_rows], ref[x_rows], ref[j_rows], beta)
    if mode == 'forward':  # -log p(y|x)/N - log p(j|x,y)/Q per triple
        loss = mle_loss(logp[x_rows], mask[x_rows]) + mle_loss(logp[j_rows], mask[j_rows])
    elif mode in ('sft', 'sft_all', 'hindsight', 'ilf_mle'):
        loss = mle_loss(logp, mask)
    else:
        raise ValueError(f"unknown loss mode {mode!r}; expected cut, sft, sft_all, hindsight, "
                         "forward, ilf_mle, ilf_dpo or dpo")
    return loss, {'frac_unlikely': loss.new_zeros(())}  # a tensor: no copy to the device
