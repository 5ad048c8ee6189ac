"""
The token grammar of an Aria body, as sample.py's decoder uses it: which tokens may come next after
each token, as an additive -inf bias over the logits, so that every sample decodes to MIDI. Ours,
not official (the official sampler draws from the whole vocabulary: sample.py --no_grammar).
"""
import functools
from collections import namedtuple

import torch

import tokenizer as T

# The token grammar. A body (after `prefix <S>`) is  (event | <T> | <D>)* <E>  with
#   event = note onset dur  |  drum onset  |  pedal onset  (pedal: the 17729-token vocabulary)
# A row's state says where it stands; "+ DIM_USED" once it has seen <D> (at most one).
#   START       event boundary, nothing completed just before (after <S>, <T>, <D>)
#   EVENT       event boundary right after a complete event: <E> is allowed only here
#   NOTE        after a note token: an onset
#   NOTE_ONSET  after a note's onset: a duration (10..5000 ms; dur 0 never occurs)
#   DRUM        after a drum or pedal token: an onset
#   DONE        after <E>: only <P>
# At a boundary: notes of the instruments named in the row's prefix (never the velocity-0
# ids, which the tokenizer never produces), drums if the drum prefix is there, <T>, <D>
# (once), <E> (only in EVENT), <PED_ON> while the pedal is up and <PED_OFF> while it is down
# (they alternate, as the official demo's decoder assumes). Onsets never go back in time inside
# a segment (>= the last onset since the last <T>). <S>, <P>, <U> and prefixes never appear in a body.

START = 0
EVENT = 1
NOTE = 2
NOTE_ONSET = 3
DRUM = 4
DONE = 5
DIM_USED = 6
N_STATES = 12


@functools.cache
def _tables(V=T.VOCAB_SIZE):
    """(N_STATES, V) bool: the tokens allowed in each state; (N_STATES, V) long: the state
    after each token, for a vocabulary of V (17727, or 17729 with the pedal). Tokens the grammar
    forbids (possible in a user's prompt or with grammar=False) still lead to the nearest
    sensible state."""
    cls = torch.from_numpy(T.TOKEN_CLASS[:V].astype("int64"))
    ids = torch.arange(V)
    note_ok = (cls == T.NOTE) & ((ids - T.NOTE_START) % 13 != 0)   # velocity 0 excluded
    boundary = note_ok | (cls == T.DRUM) | (cls == T.PEDAL)
    boundary[T.SEG_ID] = True
    allowed = torch.zeros(N_STATES, V, dtype=torch.bool)
    nxt = torch.empty(N_STATES, V, dtype=torch.long)
    for dim in (0, DIM_USED):
        allowed[START + dim] = boundary
        allowed[START + dim, T.DIM_ID] = dim == 0
        allowed[EVENT + dim] = allowed[START + dim]
        allowed[EVENT + dim, T.EOS_ID] = True
        allowed[NOTE + dim] = cls == T.ONSET
        allowed[DRUM + dim] = cls == T.ONSET
        allowed[NOTE_ONSET + dim] = (cls == T.DUR) & (ids != T.DUR_START)
        allowed[DONE + dim, T.PAD_ID] = True
        for s in range(DONE):
            # the state after a token of each class; <S> <P> <U> and prefixes are not body tokens
            after = {T.SPECIAL: START, T.PREFIX: START, T.NOTE: NOTE, T.DRUM: DRUM, T.DUR: EVENT,
                     T.ONSET: NOTE_ONSET if s == NOTE else EVENT, T.PEDAL: DRUM}
            nxt[s + dim] = torch.tensor([after[c] for c in range(len(after))])[cls] + dim
            nxt[s + dim, T.EOS_ID] = DONE + dim
            nxt[s + dim, T.DIM_ID] = START + DIM_USED
        nxt[DONE + dim] = DONE + dim
    return allowed, nxt


class PromptInfo(namedtuple("PromptInfo", "instruments state last_onset segments pedal_down")):
    @property
    def last_ms(self):
        """The prompt's last onset, in ms from its start."""
        return self.segments * T.SEGMENT_MS + (self.last_onset - T.ONSET_START) * T.TIME_STEP_MS


def prompt_info(ids, V=T.VOCAB_SIZE):
    """What a prompt fixes for its continuation: (instruments named in the prefix, grammar state
    after the prompt, last onset id in its last segment, segments before it, pedal down)."""
    ids = [int(i) for i in ids]
    if max(ids) >= V:
        why = "pedal tokens for a model without them" if max(ids) >= T.PED_ON_ID else "not an Aria prompt"
        raise ValueError(f"prompt has token {max(ids)}, beyond the model's {V}-token vocabulary "
                         f"({why})")
    if T.BOS_ID not in ids:
        raise ValueError("prompt has no <S>: expected `prefix <S> body` (tokenizer.prompt gives one)")
    if T.EOS_ID in ids:
        raise ValueError("prompt contains <E>: the piece is already over; remove it to continue")
    bos = ids.index(T.BOS_ID)
    names = {i: name for name, i in T.INSTRUMENT_PREFIX_ID.items()}
    instruments = {names[i] for i in ids[:bos] if i in names}
    if not instruments:
        raise ValueError("prompt prefix names no instrument, so no note could follow")
    nxt = _tables(V)[1]
    state, last = START, T.ONSET_START
    for i in ids[bos + 1:]:
        state = int(nxt[state, i])
        if i == T.SEG_ID:
            last = T.ONSET_START
        elif T.TOKEN_CLASS[i] == T.ONSET:
            last = i
    pedals = [i for i in ids if i in (T.PED_ON_ID, T.PED_OFF_ID)]
    return PromptInfo(instruments, state, last, ids[bos + 1:].count(T.SEG_ID), pedals[-1:] == [T.PED_ON_ID])


class Grammar:
    """Per-row grammar state for a batch, on the device. bias() is the (B, V) logit bias, 0
    where allowed and -inf where not: a row of a precomputed (B x N_STATES, V) table (the
    state's tokens, the row's instruments) plus, on the onset ids, a row of an (onsets,
    onsets) table for the onset lower bound (harmless where onsets are banned anyway): row
    lookups and adds, several times cheaper on CPU than comparisons and masked_fill over the
    vocabulary. advance() is a table lookup. time_ms() is each row's music time: the onset of
    its last event. min_onset_ms (live.py): no new onset before this time in the last segment."""

    def __init__(self, prompts, device="cpu", eos=True, dim=True, min_onset_ms=0, max_onset_ms=None,
                 V=T.VOCAB_SIZE):
        allowed, nxt = _tables(V)
        inf = float("-inf")
        info = [prompt_info(p, V) for p in prompts]  # a PromptInfo per row
        row_ok = torch.ones(len(info), V, dtype=torch.bool)  # (B, V): only the row's instruments
        for b, (instruments, *_) in enumerate(info):
            for k, name in enumerate(T.INSTRUMENTS):
                if name not in instruments:
                    start = T.NOTE_START + k * T.NOTES_PER_INSTRUMENT
                    row_ok[b, start:start + T.NOTES_PER_INSTRUMENT] = False
            if "drum" not in instruments:
                row_ok[b, T.DRUM_START:T.DUR_START] = False
        row_ok[:, T.EOS_ID] = eos
        row_ok[:, T.DIM_ID] = dim
        ok = allowed & row_ok[:, None]  # (B, N_STATES, V)
        self.table = torch.zeros(ok.shape).masked_fill_(~ok, inf).flatten(0, 1).to(device)  # (B*N_STATES, V)
        k = torch.arange(T.VOCAB_SIZE - T.ONSET_START)  # the onsets: the default vocabulary's last ids
        # row j: 0 for the onsets >= j, -inf below
        self.onset_floor = torch.zeros(len(k), len(k)).masked_fill_(k < k[:, None], inf).to(device)
        # pedal up: <PED_ON> may come; down: <PED_OFF>
        self.pedal_table = torch.tensor([[0.0, inf], [inf, 0.0]], device=device)
        self.pedal_down = torch.tensor([i[4] for i in info], device=device)  # (B,)
        self.next = nxt.to(device)
        self.first_row = torch.arange(len(info), device=device) * N_STATES  # (B,)
        self.state = torch.tensor([i[1] for i in info], device=device)  # (B,)
        floor = T.onset_id(min(min_onset_ms, T.SEGMENT_MS - T.TIME_STEP_MS))
        self.last_onset = torch.tensor([max(i[2], floor) for i in info], device=device)  # (B,) onset id
        self.seg = torch.tensor([i[3] for i in info], device=device)  # (B,) <T>s so far
        # max_onset_ms (live.py): until a row's first note, no onset later than this after the start of
        # the prompt's last segment (ms; <T> only while it lies beyond), so a leading rest is bounded
        self.cap = None if max_onset_ms is None else torch.full((len(info),), max_onset_ms, device=device)
        self.first = torch.ones(len(info), dtype=torch.bool, device=device)  # (B,) no note yet

    def bias(self):
        """(B, V) float: 0 for the tokens each row may take next, -inf for the others."""
        b = self.table.index_select(0, self.first_row + self.state)
        b[:, T.ONSET_START:T.VOCAB_SIZE] += self.onset_floor.index_select(0, self.last_onset - T.ONSET_START)
        if b.shape[1] > T.VOCAB_SIZE:
            b[:, T.PED_ON_ID:] += self.pedal_table.index_select(0, self.pedal_down.long())
        if self.cap is not None:  # row j of the floor table's transpose: onsets <= j
            last = self.onset_floor.shape[0] - 1
            j = torch.where(self.first, (self.cap // T.TIME_STEP_MS).clamp(0, last), last)
            b[:, T.ONSET_START:T.VOCAB_SIZE] += self.onset_floor.t().index_select(0, j)
            b[:, T.SEG_ID] += torch.where(self.first & (self.cap < T.SEGMENT_MS), float("-inf"), 0.0)
        return b

    def advance(self, tok):
        """Move every row past its token tok (B,), in place (a CUDA graph replays on these buffers)."""
        onset = (tok >= T.ONSET_START) & (tok < T.VOCAB_SIZE)
        last = torch.where(tok == T.SEG_ID, T.ONSET_START, torch.where(onset, tok, self.last_onset))
        if self.cap is not None:
            self.first.logical_and_(~(onset & (self.state % DIM_USED == NOTE)))
            self.cap.sub_((tok == T.SEG_ID) * T.SEGMENT_MS)
        self.state.copy_(self.next[self.state, tok])
        self.last_onset.copy_(last)
        self.seg.add_(tok == T.SEG_ID)
        self.pedal_down.copy_((tok == T.PED_ON_ID) | self.pedal_down & (tok != T.PED_OFF_ID))

    def time_ms(self):
        return self.seg * T.SEGMENT_MS + (self.last_onset - T.ONSET_START) * T.TIME_STEP_MS

    @property
    def at_event(self):
        """Rows right after a complete event: where <E> may come."""
        return self.state % DIM_USED == EVENT

    @property
    def done(self):
        return self.state % DIM_USED == DONE

    @property
    def dim_used(self):
        return self.state >= DIM_USED


